"""FlashSloth recipe: configs, data, preprocessing, template, checkpoints and schedule.

One module per job, each usable on its own:

- `config`: typed YAML configs with ``key=value`` overrides.
- `synthetic`: a small synthetic LLaVA-format data set (``python -m recipes.flashsloth.synthetic``).
- `tokenizer`: a tiny byte-level BPE tokenizer trained in code, for CPU runs and tests.
- `image_processing`: SigLIP and FlashSloth-HD preprocessing.
- `template`: Vicuna-v1 and "plain" templates, tokenized segment by segment.
- `data`: LLaVA JSON data sets, the padding collator and a resumable, sharded sampler.
- `schedule`: linear warmup + cosine learning-rate schedule.
- `checkpoint`: atomic safetensors + JSON checkpoints and RNG capture for exact resume.
- `model`: `FlashSlothConfig` presets (paper, paper_hd, tiny), `build_flashsloth`, and
  `FlashSloth` (save_pretrained / from_pretrained, components for stage-wise training).
- `convert`: the authors' released checkpoints -> a `FlashSloth` folder
  (``python -m recipes.flashsloth.convert``).
- `chat`: batched greedy answers with the KV cache (``python -m recipes.flashsloth.chat``).
- `train`: the training script, one stage per run (``python -m recipes.flashsloth.train``,
  or under ``torchrun``); `model_setup` turns a config into a model, `distributed` holds
  the torchrun/FSDP2/DDP plumbing, `metric_log` the JSONL log.
- `evaluate`: held-out accuracy on the synthetic set (``python -m recipes.flashsloth.evaluate``).
- `demo`: the whole recipe on CPU in minutes (``python -m recipes.flashsloth.demo``).

Heavy imports (PIL, tokenizers) stay inside the modules that need them.
"""
