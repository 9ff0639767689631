"""Write a held-out LLaVA JSON test set as a local lmms-eval task (no hub, no network).

    records = load_llava_json("data/synthetic/test.json")
    yaml_path = write_local_task(records, "data/synthetic/images", "outputs/lmms_task")
    # lmms-eval --include_path outputs/lmms_task --tasks tokencompress_synthetic ...

``out_dir`` receives::

    data/                 datasets.DatasetDict({split: Dataset}) (save_to_disk), string
                          columns id, question, answer, question_type, image (absolute path)
    <task_name>.yaml      the task: load_from_disk, generate_until, exact_match and skipped
    utils.py              re-exports `tokencompress.evaluation.task_functions`

The questions and the scoring are the recipe's (`recipes.flashsloth.evaluate`): the first
human turn without its ``<image>`` marker, greedy answers of at most ``max_new_tokens``
tokens that stop only at the end-of-sequence token, and exact match after
`normalize_answer`. So the task's ``exact_match`` equals the recipe's held-out accuracy.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .task_functions import load_recipe_evaluate

__all__ = ["TASK_VERSION", "write_local_task"]

#: The ``metadata.version`` of the written task: lmms-eval reports it with the scores, so
#: it changes whenever the documents, prompt or scoring of the task change.
TASK_VERSION = 1.0

DATA_FOLDER = "data"
UTILS_FILE = "utils.py"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a file stem and an lmms-eval task name
_SPLIT = re.compile(r"\w+(\.\w+)*")  # what `datasets` accepts as a split name
_COLUMNS = ("id", "question", "answer", "question_type", "image")

_UTILS_SOURCE = '''"""Functions of the lmms-eval task next to this file (written by tokencompress)."""

from tokencompress.evaluation.task_functions import (
    SKIPPED_ANSWER,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    process_results,
)

__all__ = ["SKIPPED_ANSWER", "doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]
'''


class _Function(str):
    """A YAML ``!function`` reference (lmms-eval resolves ``utils.name`` next to the YAML)."""


class _TaskDumper(yaml.SafeDumper):
    """A SafeDumper that writes `_Function` as ``!function``; its own class, so the
    representer is not added to PyYAML's global SafeDumper."""


_TaskDumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def write_local_task(
    records: Sequence[Mapping[str, Any]],
    image_folder: str | Path,
    out_dir: str | Path,
    *,
    task_name: str = "tokencompress_synthetic",
    split: str = "test",
    max_new_tokens: int = 8,
) -> Path:
    """Write ``records`` (LLaVA JSON with an "answer" each) as an lmms-eval task in ``out_dir``.

    Each record needs "conversations" (the first turn is the question) and "answer"; "id"
    (default: ``#<index>``, as the recipe names samples), "image" (relative to
    ``image_folder``; absent or empty for a text-only question) and "question_type"
    (default "all", as in the recipe) are optional. Every image file must exist; whether it
    can be decoded is left to the model, which names the sample if it cannot.

    ``out_dir`` must be empty, new, or an earlier output of this function (it is rewritten);
    lmms-eval indexes every YAML under an include path, so it holds nothing else. Pass
    ``out_dir`` to lmms-eval's ``--include_path``. Built-in lmms-eval tasks win over
    included ones of the same name, so ``task_name`` should be one lmms-eval does not have.

    Returns the path of the task YAML. Raises ValueError (naming the argument, the record
    and the value) on bad input, before anything is written.
    """
    if not isinstance(task_name, str) or not _NAME.fullmatch(task_name):
        raise ValueError(
            f"task_name must be letters, digits, '_' or '-' (starting with a letter or digit), got {task_name!r}"
        )
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise ValueError(f"split must be a datasets split name (letters, digits, '_', '.'), got {split!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    folder = Path(image_folder)
    if not folder.is_dir():
        raise ValueError(f"image_folder {str(folder)!r} is not a directory")
    columns = _columns(records, folder)
    out = Path(out_dir).absolute()  # absolute: the YAML's dataset_path must not depend on the cwd
    _check_out_dir(out, task_name)

    # Only now write: a bad record above leaves out_dir as it was.
    import datasets  # lazily: a second or so, and only this function needs it

    data_dir = out / DATA_FOLDER
    if data_dir.exists():
        shutil.rmtree(data_dir)  # an earlier output (checked): stale shards must not stay
    features = datasets.Features({name: datasets.Value("string") for name in _COLUMNS})
    dataset = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({split: dataset}).save_to_disk(str(data_dir))

    (out / UTILS_FILE).write_text(_UTILS_SOURCE, encoding="utf-8")
    yaml_path = out / f"{task_name}.yaml"
    config = _task_config(task_name, data_dir, split, max_new_tokens)
    text = yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    yaml_path.write_text(f"# Written by tokencompress.evaluation.local_task; {len(dataset)} samples.\n{text}",
                         encoding="utf-8")
    return yaml_path


def _columns(records: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, list[str]]:
    """The data set's columns from ``records``, each record checked; errors name the record."""
    if isinstance(records, (str, bytes, Path, Mapping)) or not isinstance(records, Sequence):
        raise ValueError(
            f"records must be a list of LLaVA records (e.g. load_llava_json(path)), got {type(records).__name__}"
        )
    if not records:
        raise ValueError("records is empty: a task needs at least one sample")
    question_of = load_recipe_evaluate()._question  # the recipe's own rule, so prompts match
    columns: dict[str, list[str]] = {name: [] for name in _COLUMNS}
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"records[{index}] must be a mapping, got {type(record).__name__}")
        sample_id = str(record["id"]) if record.get("id") is not None else f"#{index}"
        where = f"records[{index}] (id {sample_id!r})"
        if sample_id in seen:
            raise ValueError(f"{where}: duplicate id, also records[{seen[sample_id]}]")
        seen[sample_id] = index

        conversations = record.get("conversations")
        if (
            not isinstance(conversations, Sequence)
            or isinstance(conversations, str)
            or not conversations
            or not isinstance(conversations[0], Mapping)
            or not isinstance(conversations[0].get("value"), str)
        ):
            raise ValueError(f"{where}: 'conversations' must be a non-empty list whose first turn has a string 'value'")
        question = question_of(record)
        if not question:
            raise ValueError(
                f"{where}: the first turn holds no question (only the image marker?); "
                "a pre-training caption file has no questions: pass the test file"
            )

        if "answer" not in record:
            raise ValueError(f"{where}: no 'answer' (the reference the task scores against)")
        answer = record["answer"]
        if not isinstance(answer, str):
            raise ValueError(f"{where}: 'answer' must be a string, got {answer!r}")

        question_type = record.get("question_type", "all")
        if not isinstance(question_type, str):
            raise ValueError(f"{where}: 'question_type' must be a string, got {question_type!r}")

        image = record.get("image")
        if image is None or image == "":
            image_path = ""  # text-only: doc_to_visual gives no visual
        elif not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be a path string, got {image!r}")
        else:
            # abspath, not resolve(): keep the user's (symlinked) spelling, drop any "..".
            image_path = os.path.abspath(folder / image)
            if not os.path.isfile(image_path):
                raise ValueError(f"{where}: image file {image_path!r} does not exist (image {image!r})")

        for name, value in zip(_COLUMNS, (sample_id, question, answer, question_type, image_path)):
            columns[name].append(value)
    return columns


def _check_out_dir(out: Path, task_name: str) -> None:
    """Refuse an ``out_dir`` holding anything but an earlier output, which is rewritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # __pycache__: lmms-eval imports utils.py from its file, which may leave bytecode.
    ours = {DATA_FOLDER, UTILS_FILE, f"{task_name}.yaml", "__pycache__"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise ValueError(
            f"out_dir {str(out)!r} holds files this function did not write ({', '.join(foreign[:5])}); "
            "lmms-eval would index any YAML among them: use an empty or new folder"
        )
    data_dir = out / DATA_FOLDER
    if data_dir.exists() and not (data_dir / "dataset_dict.json").is_file():
        raise ValueError(f"out_dir {str(out)!r}: {DATA_FOLDER}/ is not a saved DatasetDict; not overwriting it")


def _task_config(task_name: str, data_dir: Path, split: str, max_new_tokens: int) -> dict[str, Any]:
    """The task YAML's contents (see the module docstring for why each setting)."""
    return {
        "task": task_name,
        "dataset_path": str(data_dir),
        "dataset_kwargs": {"load_from_disk": True},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_visual": _Function("utils.doc_to_visual"),
        "doc_to_text": _Function("utils.doc_to_text"),
        "doc_to_target": _Function("utils.doc_to_target"),
        "process_results": _Function("utils.process_results"),
        "generation_kwargs": {
            # FlashSlothChat stops only at the end-of-sequence token: no stop strings. An
            # absent "until" would make lmms-eval stop at "\n\n", so it is set, empty.
            "until": [],
            "max_new_tokens": max_new_tokens,
            "temperature": 0,
            "do_sample": False,
            "num_beams": 1,
        },
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            # The share of samples the model skipped for an unreadable image.
            {"metric": "skipped", "aggregation": "mean", "higher_is_better": False},
        ],
        "metadata": {"version": TASK_VERSION},
    }
