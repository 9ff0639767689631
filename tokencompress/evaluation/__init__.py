"""Evaluation through lmms-eval (the optional extra `eval`).

- `model_args`: the `tokencompress` model's arguments, checked before anything loads;
- `backends`: a FlashSloth folder, or a Hugging Face model with grafts, answering batches;
- `lmms_model`: the lmms-eval model class (imports lmms-eval);
- `plugin`: the entry point through which lmms-eval finds it;
- `local_task`, `task_functions`: an lmms-eval task written from local data (the recipe's
  synthetic set), with no hub access.

Importing this package imports none of them.
"""
