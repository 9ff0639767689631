"""The local lmms-eval task: written from the synthetic detail set, loaded by lmms-eval's
own TaskManager with the network blocked, and scored like the recipe's evaluation."""

from __future__ import annotations

import importlib
import random
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets")
lmms_tasks = pytest.importorskip("lmms_eval.tasks")  # optional; importing it takes ~5-7 s (transformers)
lmms_task_api = pytest.importorskip("lmms_eval.api.task")

from recipes.flashsloth.data import load_llava_json  # noqa: E402
from recipes.flashsloth.evaluate import evaluate  # noqa: E402
from recipes.flashsloth.synthetic import generate_dataset  # noqa: E402
from tokencompress.evaluation.local_task import TASK_VERSION, write_local_task  # noqa: E402
from tokencompress.evaluation.task_functions import (  # noqa: E402
    SKIPPED_ANSWER,
    doc_to_text,
    doc_to_visual,
    load_recipe_evaluate,
    load_recipe_module,
    process_results,
)

NAME = "tokencompress_synthetic"
NUM_TEST = 30  # ten questions of each of the three detail types


@pytest.fixture(scope="module")
def detail_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe's synthetic detail set: one training and NUM_TEST test pictures (read-only)."""
    out = tmp_path_factory.mktemp("detail")
    generate_dataset(out, num_train=1, num_test=NUM_TEST, seed=0, image_size=48, task="detail", progress=False)
    return out


@pytest.fixture(scope="module")
def records(detail_set: Path) -> list[dict[str, Any]]:
    return load_llava_json(detail_set / "test.json")


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network, and every cache in tmp_path: a load that tried the hub fails loudly."""
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / "cache" / name.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # lmms-eval picks its datasets cache folder once per process (lru_cache): forget the
    # pick, so this test's folder is used, and forget it again so no later test gets it.
    resolve_cache = getattr(lmms_task_api, "_resolve_hf_datasets_cache_dir", None)
    if resolve_cache is not None:
        resolve_cache.cache_clear()
    yield
    if resolve_cache is not None:
        resolve_cache.cache_clear()


def load_task(include_path: Path, *, include_defaults: bool = False) -> Any:
    """The task as lmms-eval loads it (TaskManager + get_task_dict, as its CLI does)."""
    manager = lmms_tasks.TaskManager(include_path=str(include_path), include_defaults=include_defaults)
    return lmms_tasks.get_task_dict([NAME], manager)[NAME]


@pytest.fixture
def task(records: list[dict[str, Any]], detail_set: Path, tmp_path: Path) -> Any:
    return load_task(write_local_task(records, detail_set / "images", tmp_path / "task").parent)


def test_docs_are_the_records(task: Any, records: list[dict[str, Any]], detail_set: Path) -> None:
    docs = list(task.eval_docs)
    expected = [
        {
            "id": r["id"],
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": r["answer"],
            "question_type": r["question_type"],
            "image": str((detail_set / "images" / r["image"]).absolute()),
        }
        for r in records
    ]
    assert docs == expected
    assert {doc["question_type"] for doc in docs} == {"dot", "colour", "shape"}


def test_task_config(task: Any) -> None:
    assert task.OUTPUT_TYPE == "generate_until"
    assert task.VERSION == TASK_VERSION
    # Greedy, stopping only at EOS like FlashSlothChat (an absent `until` would mean "\n\n").
    assert task.config.generation_kwargs == {
        "until": [], "max_new_tokens": 8, "temperature": 0.0, "do_sample": False, "num_beams": 1,
    }
    assert task.higher_is_better() == {"exact_match": True, "skipped": False}
    assert set(task.aggregation()) == {"exact_match", "skipped"}


def test_visual_text_and_target(task: Any) -> None:
    doc = task.eval_docs[0]
    visuals = task.doc_to_visual(doc)
    assert visuals == [doc["image"]] and Path(visuals[0]).is_absolute() and Path(visuals[0]).is_file()
    assert task.doc_to_text(doc) == doc["question"] and "<image>" not in doc["question"]
    assert task.doc_to_target(doc) == doc["answer"]


@pytest.mark.parametrize(
    "spell", [str, str.upper, lambda a: f"The {a}.", lambda a: f"  an {a.title()}! ", lambda a: f"a {a}\n"],
    ids=["plain", "upper", "article-period", "article-title-bang", "newline"],
)
def test_correct_answer_scores_one(task: Any, spell: Any) -> None:
    doc = task.eval_docs[0]
    assert task.process_results(doc, [spell(doc["answer"])]) == {"exact_match": 1.0, "skipped": 0.0}


@pytest.mark.parametrize("wrong", ["purple", "", "blue green", "not sure"])
def test_wrong_answer_scores_zero(task: Any, wrong: str) -> None:
    doc = next(d for d in task.eval_docs if d["answer"] not in wrong.split())
    assert task.process_results(doc, [wrong]) == {"exact_match": 0.0, "skipped": 0.0}


def test_skipped_answer_counts_as_skipped(task: Any) -> None:
    doc = task.eval_docs[0]
    assert task.process_results(doc, [SKIPPED_ANSWER]) == {"exact_match": 0.0, "skipped": 1.0}
    # Even a reference equal to the sentinel (which no real answer is) is not scored correct.
    assert process_results({**doc, "answer": SKIPPED_ANSWER}, [SKIPPED_ANSWER])["exact_match"] == 0.0


class ScriptedChat:
    """Stands in for FlashSlothChat in the recipe's `evaluate`: seeded answers, questions logged."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.questions: list[str] = []

    def answer(self, images: Sequence[Any], questions: Sequence[str], *, max_new_tokens: int) -> list[str]:
        self.questions += questions
        return [self.rng.choice(["red", "Blue.", "the circle", "a Green!", "square", "yellow"]) for _ in questions]


def test_exact_match_equals_recipe_accuracy(task: Any, records: list[dict[str, Any]], detail_set: Path) -> None:
    recipe_chat, task_chat = ScriptedChat(seed=1), ScriptedChat(seed=1)
    recipe = evaluate(recipe_chat, records, detail_set / "images", batch_size=7)
    docs = list(task.eval_docs)
    answers = task_chat.answer([task.doc_to_visual(d) for d in docs], [task.doc_to_text(d) for d in docs],
                               max_new_tokens=8)
    scores = [task.process_results(doc, [answer])["exact_match"] for doc, answer in zip(docs, answers)]
    assert task_chat.questions == recipe_chat.questions  # the model is asked the same questions
    assert 0 < sum(scores) < len(scores)  # some right and some wrong, so the comparison means something
    assert sum(scores) / len(scores) == pytest.approx(recipe.accuracy)


def test_task_functions_on_plain_docs() -> None:
    assert doc_to_visual({"image": "/data/a.png"}) == ["/data/a.png"]
    assert doc_to_visual({"image": ""}) == [] and doc_to_visual({"image": None}) == []
    kwargs = {"pre_prompt": "Q: ", "post_prompt": "\nA:"}
    assert doc_to_text({"question": "What colour?"}, kwargs) == "Q: What colour?\nA:"
    with pytest.raises(ValueError, match="no prediction"):
        process_results({"id": "x", "answer": "red"}, [])


def test_recipe_import_falls_back_to_the_checkout_only_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = "tokencompress.recipes"
    # Neither copy imported yet (an imported `recipes` copy would be used as it is).
    for name in [n for n in sys.modules if n.startswith((installed + ".", "recipes.flashsloth"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, installed, None)  # makes importing it raise ModuleNotFoundError
    assert load_recipe_evaluate().__name__ == "recipes.flashsloth.evaluate"

    def broken_recipe(name: str) -> None:
        raise ModuleNotFoundError("No module named 'PIL'", name="PIL")

    monkeypatch.setattr(importlib, "import_module", broken_recipe)
    with pytest.raises(ModuleNotFoundError, match="PIL"):  # a missing dependency is not masked
        load_recipe_evaluate()


def test_missing_id_made_from_index_and_text_only_record(records: list[dict[str, Any]], detail_set: Path,
                                                         tmp_path: Path) -> None:
    text_only = {"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}],
                 "answer": "red"}
    no_id = {k: v for k, v in records[1].items() if k != "id"}
    task = load_task(write_local_task([records[0], no_id, text_only], detail_set / "images", tmp_path / "t").parent)
    docs = list(task.eval_docs)
    assert [d["id"] for d in docs] == [records[0]["id"], "#1", "#2"]
    assert docs[2]["image"] == "" and task.doc_to_visual(docs[2]) == []
    assert docs[2]["question_type"] == "all"


def test_rewriting_replaces_the_task(records: list[dict[str, Any]], detail_set: Path, tmp_path: Path) -> None:
    write_local_task(records, detail_set / "images", tmp_path / "t")
    yaml_path = write_local_task(records[:3], detail_set / "images", tmp_path / "t", max_new_tokens=4)
    task = load_task(yaml_path.parent)
    assert [d["id"] for d in task.eval_docs] == [r["id"] for r in records[:3]]
    assert task.config.generation_kwargs["max_new_tokens"] == 4


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rs: [], "records is empty"),
        (lambda rs: "data/test.json", "records must be a list"),
        (lambda rs: [rs[0], _without(rs[1], "answer")], r"records\[1\] \(id 'test-000001'\): no 'answer'"),
        (lambda rs: [{**rs[0], "answer": 3}], "'answer' must be a string"),
        (lambda rs: [{**rs[0], "image": "missing.png"}], r"id 'test-000000'.*missing\.png' does not exist"),
        (lambda rs: [rs[0], rs[0]], "duplicate id"),
        (lambda rs: [{**rs[0], "conversations": [{"from": "human", "value": "<image>"}]}], "holds no question"),
        (lambda rs: [{**rs[0], "conversations": []}], "'conversations' must be a non-empty list"),
        (lambda rs: [{**rs[0], "image": 5}], "'image' must be a path string"),
    ],
    ids=["empty", "path-not-records", "no-answer", "answer-type", "missing-image", "duplicate-id",
         "caption-record", "no-conversation", "image-type"],
)
def test_bad_records_raise_before_writing(records: list[dict[str, Any]], detail_set: Path, tmp_path: Path,
                                          change: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_local_task(change(records), detail_set / "images", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_name": "../escape"}, "task_name must be"),
        ({"task_name": ""}, "task_name must be"),
        ({"split": "test set"}, "split must be"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"max_new_tokens": True}, "max_new_tokens must be a positive int"),
    ],
)
def test_bad_arguments_raise(records: list[dict[str, Any]], detail_set: Path, tmp_path: Path,
                             kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_local_task(records, detail_set / "images", tmp_path / "out", **kwargs)


def test_bad_folders_raise(records: list[dict[str, Any]], detail_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_folder .* is not a directory"):
        write_local_task(records, tmp_path / "nowhere", tmp_path / "out")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "other.yaml").write_text("task: other\n")
    with pytest.raises(ValueError, match=r"files this function did not write \(other\.yaml\)"):
        write_local_task(records, detail_set / "images", crowded)
    foreign_data = tmp_path / "foreign"
    (foreign_data / "data").mkdir(parents=True)
    with pytest.raises(ValueError, match="data/ is not a saved DatasetDict"):
        write_local_task(records, detail_set / "images", foreign_data)


@pytest.mark.slow
def test_found_among_lmms_eval_builtin_tasks(records: list[dict[str, Any]], detail_set: Path,
                                             tmp_path: Path) -> None:
    """With lmms-eval's ~2000 built-in tasks indexed too (~6 s), as its CLI does: built-in
    names win over included ones, so the default name must not be a built-in's."""
    yaml_path = write_local_task(records[:2], detail_set / "images", tmp_path / "t")
    manager = lmms_tasks.TaskManager(include_path=str(yaml_path.parent))
    assert manager.task_index[NAME]["yaml_path"] == str(yaml_path)
    task = lmms_tasks.get_task_dict([NAME], manager)[NAME]
    assert [d["id"] for d in task.eval_docs] == [r["id"] for r in records[:2]]


def test_the_recipe_already_imported_as_recipes_is_the_one_used() -> None:
    """Two copies of the recipe would have two FlashSloth classes: a caller's model would not
    be a FlashSloth to the backend's chat. The copy the caller imported wins."""
    import recipes.flashsloth.model  # noqa: F401

    caller_model = sys.modules["recipes.flashsloth.model"]
    assert load_recipe_module("model") is caller_model
    assert load_recipe_module("chat").FlashSloth is caller_model.FlashSloth
