"""FlashSloth training recipe: one stage per run (alignment, or instruction tuning).

    python -m recipes.flashsloth.train --config tiny_stage1 [key=value ...]
    torchrun --nproc_per_node 8 -m recipes.flashsloth.train --config stage1

A readable script in four parts, torchtune-style:

- setup: tokenizer; model (pretrained parts, stage 1's SAP and projector at stage 2, the
  stage's trainable parts); data; AdamW; warmup + cosine schedule; resume from the
  latest checkpoint in ``checkpoint.output_dir`` when there is one.
- train: gradient accumulation to the global batch, loss summed over target tokens and
  divided by the global batch's target-token count (so one process and N processes
  with the same global batch compute the same step), clipping, bf16 autocast on GPU.
- save: atomic checkpoints every ``save_every_n_steps`` (full state dicts written by
  rank 0), and at the end the model folder that `FlashSloth.from_pretrained` loads.
- resume: model, optimizer, schedule, data position and every rank's RNG state, so a
  resumed run repeats the losses of an uninterrupted one exactly.

What a run writes into ``checkpoint.output_dir``: ``config.yaml``, ``tokenizer/``,
``log.jsonl`` (one line per logged step: step, epoch, loss, lr, grad_norm, tokens,
elapsed), ``step_*/`` checkpoints (model tensors under their canonical names), ``model/``
(the final model) and, for stage 2 with ``data.eval_json``, ``eval.json`` (held-out
accuracy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .checkpoint import (
    Checkpoint,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import ConfigError, RecipeConfig, dump_config, parse_cli
from .data import DataCollator, LlavaDataset, ResumableSampler
from .distributed import DistributedEnv
from .metric_log import MetricLog
from .model import FlashSloth, prepare_tokenizer
from .model_setup import TOKENIZER_DIR, build_model, canonical_names, load_tokenizer, rebuild_model
from .schedule import WarmupCosineSchedule
from .template import IGNORE_INDEX

if TYPE_CHECKING:  # evaluate imports the chat API (PIL, generation); only at the end of stage 2
    from .evaluate import EvalResult

__all__ = ["FlashSlothRecipe", "StepCallback", "main", "sum_token_loss"]

logger = logging.getLogger("recipes.flashsloth.train")

#: Called after every optimizer step (and its checkpoint, if any) with the step number.
StepCallback = Callable[[int], None]

LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
EVAL_FILE = "eval.json"


def sum_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the target tokens, and their number.

    Token t predicts token t + 1; labels of IGNORE_INDEX (prompt, images, queries,
    padding) are not targets. A batch without targets gives a zero loss that still
    backpropagates (so every rank takes part in the gradient reduction).
    """
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),  # in fp32, as transformers computes it
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def _autocast(env: DistributedEnv, dtype: str) -> contextlib.AbstractContextManager:
    # Master weights stay fp32; only the compute runs in bf16.
    if dtype == "bf16":
        return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases, norms and other 1-D tensors."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _gathered_rng_states(env: DistributedEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order); each rank's dropout stream must resume as its own."""
    state = capture_rng_state()
    if not env.is_distributed:
        return [state]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, state)
    return states


class FlashSlothRecipe:
    """One training stage: ``setup()``, then ``train()``; ``cleanup()`` at the end."""

    def __init__(self, config: RecipeConfig) -> None:
        self.config = config
        self.output_dir = Path(config.checkpoint.output_dir)
        self.step = 0  # optimizer steps done
        self._elapsed_before = 0.0  # training seconds of earlier (interrupted) runs

    # ------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Everything `train` needs, resumed from the latest checkpoint when there is one."""
        config = self.config
        if config.training.dtype == "fp16":
            raise ConfigError(
                "training.dtype=fp16 needs loss scaling, which this recipe does not do; use bf16 "
                "(fp32's range, no scaling) on GPUs that have it, else fp32"
            )
        self.env = distributed.init_distributed(config.training.device)
        self.accumulation = config.training.gradient_accumulation_steps(self.env.world_size)
        checkpoint = self._checkpoint_to_resume()
        if self.env.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        self._setup_model(checkpoint)
        self._setup_data(self.raw_model)
        self._setup_optimizer()
        # Different dropout masks per rank; on resume, overwritten by the saved states.
        torch.manual_seed(config.training.seed + self.env.rank)
        if checkpoint is not None:
            self._restore(checkpoint)
        self.log: MetricLog | None = None
        if self.env.is_rank_zero:
            self.log = MetricLog(self.output_dir / LOG_FILE, resume_step=self.step if checkpoint else None)

    def _checkpoint_to_resume(self) -> Checkpoint | None:
        """The latest checkpoint in the output folder (read by every rank), or None."""
        latest = latest_checkpoint(self.output_dir)
        if latest is not None and not self.config.checkpoint.resume:
            # Mixing two runs' checkpoints in one folder would make a later resume pick either.
            raise ConfigError(
                f"{self.output_dir} holds checkpoints of an earlier run ({latest.name}); set "
                "checkpoint.resume=true to continue it, or choose another checkpoint.output_dir"
            )
        return load_checkpoint(latest) if latest is not None else None

    def _setup_model(self, checkpoint: Checkpoint | None) -> None:
        """Tokenizer and model; the checkpoint's weights go in before sharding."""
        config, env = self.config, self.env
        self.tokenizer = load_tokenizer(config)
        prepare_tokenizer(self.tokenizer)  # image and pad tokens; the builder adds the queries
        if env.is_rank_zero:
            _save_tokenizer(self.tokenizer, self.output_dir / TOKENIZER_DIR)
        model = build_model(config, self.tokenizer, device=env.device)
        # Checkpoints use canonical names: the same in every stage, grafted or not.
        self._canonical_names = canonical_names(model)
        if checkpoint is not None:
            model.load_components(checkpoint.model_state)  # every tensor, strictly
        self._log_parameters(model)
        if config.training.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (stage 1's frozen LLM) and FSDP2.
            model.llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.raw_model: FlashSloth = model
        self.model = distributed.wrap_model(
            model, env, config.training.parallelism, shard_units=model.llava.model.language_model.layers
        )

    def _setup_optimizer(self) -> None:
        """AdamW over the trainable parameters (after sharding: FSDP2 replaces them)."""
        config = self.config
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, config.optimizer.weight_decay),
            lr=config.optimizer.lr,
            betas=config.optimizer.betas,
            eps=config.optimizer.eps,
        )
        self.scheduler = WarmupCosineSchedule(self.optimizer, self.total_steps, config.schedule.warmup_ratio)

    def _setup_data(self, model: FlashSloth) -> None:
        config, env = self.config, self.env
        template = model.make_template(config.data.template, max_length=config.data.max_length)
        self.dataset = LlavaDataset(
            config.data.train_json,
            config.data.image_folder,
            template=template,
            image_processor=model.image_processor,
            on_bad_image=config.data.on_bad_image,
            progress=env.is_rank_zero,
        )
        self.sampler = ResumableSampler(
            len(self.dataset), seed=config.training.seed, rank=env.rank, world_size=env.world_size, drop_last=True
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=config.training.micro_batch_size,
            sampler=self.sampler,
            collate_fn=DataCollator(pad_token_id=model.pad_token_id),
            num_workers=config.data.num_workers,
            pin_memory=env.device.type == "cuda",
            drop_last=True,
            # Its own generator: creating an iterator then draws its base seed from this,
            # not from the global RNG, whose stream (dropout) must match on resume.
            generator=torch.Generator(),
        )
        global_batch = config.training.global_batch_size
        self.steps_per_epoch = len(self.dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{config.data.train_json} has {len(self.dataset)} samples, fewer than one global "
                f"batch of {global_batch}"
            )
        total = self.steps_per_epoch * config.training.epochs
        self.total_steps = min(total, config.training.max_steps or total)

    def _log_parameters(self, model: FlashSloth) -> None:
        if not self.env.is_rank_zero:
            return
        counts = model.parameter_counts()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        parts = ", ".join(f"{name} {counts[name]:,}" for name in ("vision_encoder", "compressor", "projector",
                                                                   "embq", "llm"))
        logger.info("parameters: %s; trainable %s of %s (%s)", parts, f"{trainable:,}",
                    f"{counts['total']:,}", ", ".join(self.config.model.trainable))

    # ------------------------------------------------------------------------- resume

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.training_state
        distributed.load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = checkpoint.step
        self._elapsed_before = float(state["elapsed"])
        rng = state["rng"]
        if len(rng) != self.env.world_size:
            logger.warning("checkpoint from %d ranks, now %d: dropout streams will differ", len(rng),
                           self.env.world_size)
        restore_rng_state(rng[self.env.rank % len(rng)])
        if self.env.is_rank_zero:
            logger.info("resumed from %s (step %d of %d)", checkpoint.path, self.step, self.total_steps)

    # ------------------------------------------------------------------------- train

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches from the sampler's position on, across epoch boundaries.

        An epoch ends after its last whole global batch; the samples left over (fewer
        than a global batch) are skipped, so every step sees exactly a global batch.
        """
        global_batch = self.config.training.global_batch_size
        while True:
            steps_left = (self.steps_per_epoch * global_batch - self.sampler.position) // global_batch
            iterator = iter(self.loader)
            for _ in range(steps_left * self.accumulation):
                yield next(iterator)
            del iterator  # stops its workers before the next epoch's start
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def _train_step(self, micro_batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over ``accumulation`` micro-batches; returns its metrics."""
        env, model = self.env, self.model
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        num_tokens = torch.zeros((), dtype=torch.float64, device=env.device)
        for index in range(self.accumulation):
            batch = _to_device(next(micro_batches), env.device)
            last = index == self.accumulation - 1
            with distributed.no_gradient_sync(model, enabled=not last), _autocast(env, self.config.training.dtype):
                logits = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    embq_instruction_map=batch["embq_instruction_map"],
                ).logits
                loss, tokens = sum_token_loss(logits, batch["labels"])
            loss.backward()
            self.sampler.mark_consumed(len(batch["ids"]))
            loss_sum += loss.detach()
            num_tokens += tokens
        distributed.all_reduce_sum(loss_sum)
        distributed.all_reduce_sum(num_tokens)

        total_tokens = int(num_tokens.item())
        lr = self.scheduler.get_last_lr()[0]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if total_tokens > 0:
            # Gradients hold sum-of-token-loss gradients averaged over ranks (DDP and FSDP
            # average); times world_size / tokens gives the mean over the global batch's tokens.
            scale = env.world_size / total_tokens
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            max_norm = self.config.training.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            grad_norm_value = float(grad_norm)
        else:
            # Every label of the global batch was ignored (e.g. truncated replies): nothing
            # to learn; the step still counts so that the schedule and the data stay in step.
            logger.warning("step %d: no target tokens in the global batch; optimizer step skipped", self.step + 1)
            grad_norm_value = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped optimizer step makes torch warn that the schedule runs ahead; it is on purpose.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.step += 1
        return {
            "loss": float(loss_sum.item()) / total_tokens if total_tokens else 0.0,
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": total_tokens,
        }

    def train(self, on_step_end: StepCallback | None = None) -> None:
        """Train to ``total_steps``, checkpointing on the way; then save the final model."""
        config, env = self.config, self.env
        started = time.perf_counter()
        micro_batches = self._micro_batches()
        progress = tqdm(total=self.total_steps, initial=self.step, desc=config.name, disable=not env.is_rank_zero,
                        dynamic_ncols=True)
        self.model.train()
        while self.step < self.total_steps:
            metrics = self._train_step(micro_batches)
            elapsed = self._elapsed_before + time.perf_counter() - started
            if self.log is not None and (self.step % config.training.log_every_n_steps == 0
                                         or self.step == self.total_steps):
                record = {"step": self.step, "epoch": self.sampler.epoch, **metrics, "elapsed": round(elapsed, 3)}
                self.log.write(record)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
            progress.update(1)
            if self.step % config.checkpoint.save_every_n_steps == 0 or self.step == self.total_steps:
                self.save_checkpoint(elapsed)
            if on_step_end is not None:
                on_step_end(self.step)
        progress.close()
        self.save_final_model()

    # ------------------------------------------------------------------------- save

    def save_checkpoint(self, elapsed: float) -> None:
        """Gather full state dicts (every rank) and write them atomically (rank 0)."""
        model_state = self._canonical(distributed.full_model_state_dict(self.model))
        optimizer_state = distributed.full_optimizer_state_dict(self.model, self.optimizer)
        rng_states = _gathered_rng_states(self.env)
        if self.env.is_rank_zero:
            save_checkpoint(
                self.output_dir,
                self.step,
                model_state=model_state,
                training_state={
                    "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(),
                    "sampler": self.sampler.state_dict(),
                    "rng": rng_states,
                    "elapsed": elapsed,
                    "world_size": self.env.world_size,
                },
                keep_last=self.config.checkpoint.keep_last,
            )
        distributed.barrier()

    def _canonical(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._canonical_names[name]: tensor for name, tensor in state.items()}

    def save_final_model(self) -> Path:
        """Write ``output_dir/model`` (`FlashSloth.save_pretrained`), replacing it atomically."""
        final = self.output_dir / MODEL_DIR
        if self.env.is_distributed:
            state = self._canonical(distributed.full_model_state_dict(self.model))
        if self.env.is_rank_zero:
            if self.env.is_distributed:
                # Sharded parameters: put the gathered weights in an unsharded CPU copy.
                rows = self.raw_model.llava.get_input_embeddings().weight.shape[0]
                model = rebuild_model(self.config, self.tokenizer, state, vocab_size=rows)
            else:
                model = self.raw_model
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=self.output_dir))
            try:
                with _eval_mode(model):
                    model.save_pretrained(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            logger.info("saved the final model to %s", final)
        distributed.barrier()
        return final

    def evaluate(self) -> EvalResult | None:
        """Held-out accuracy of the final model on ``data.eval_json`` (rank 0; stage 2)."""
        from .evaluate import evaluate_folder

        config = self.config
        if not (self.env.is_rank_zero and config.stage == 2 and config.data.eval_json):
            return None
        result = evaluate_folder(self.output_dir / MODEL_DIR, config.data.eval_json, config.data.image_folder)
        (self.output_dir / EVAL_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n",
                                                 encoding="utf-8")
        return result

    def cleanup(self) -> None:
        if getattr(self, "log", None) is not None:
            self.log.close()
        distributed.teardown_distributed()


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save once, atomically: other ranks (and a resumed run) may read it at any time."""
    if folder.is_dir():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=folder.parent))
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # saved meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_cli(argv, description="Train one FlashSloth stage.")
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    recipe = FlashSlothRecipe(config)
    try:
        recipe.setup()
        recipe.train()
        result = recipe.evaluate()
        if result is not None:
            print(result.summary())
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
