"""The lmms-eval model `tokencompress` (issue #14), run by lmms-eval itself on local tasks.

- A tiny FlashSloth, trained here by the recipe's demo, answers the synthetic held-out
  set through `lmms_eval.evaluator.simple_evaluate` and the `python -m lmms_eval` CLI with
  the same answers and accuracy as the recipe's own `evaluate_folder`.
- Tiny random LLaVA and Qwen2-VL folders, grafted through `model_args`, give the answers
  of their own `generate` on the same prompts, at batch sizes 1 and 4.
- Text-only and two-image samples, and log-likelihoods, against references computed here.
- Bad `model_args` fail before any model loads; an unreadable image stops the run or is
  skipped and counted.

No network: caches live in a temporary folder, the hub and datasets run offline, and
sockets refuse to connect.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("datasets")
evaluator = pytest.importorskip("lmms_eval.evaluator")  # optional; importing it takes a few seconds
lmms_models = pytest.importorskip("lmms_eval.models")
lmms_tasks = pytest.importorskip("lmms_eval.tasks")
lmms_task_api = pytest.importorskip("lmms_eval.api.task")

from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

import recipes.flashsloth.evaluate as recipe_evaluate  # noqa: E402
import tokencompress.recipes.flashsloth.model as installed_flashsloth_model  # noqa: E402
from recipes.flashsloth import model as checkout_flashsloth_model  # noqa: E402
from recipes.flashsloth.chat import FlashSlothChat  # noqa: E402
from recipes.flashsloth.data import load_llava_json  # noqa: E402
from recipes.flashsloth.demo import DemoSizes, run_demo  # noqa: E402
from tests.adapters.conftest import build_tiny_llava, make_images  # noqa: E402
from tests.adapters.tiny_qwen2_vl import CHAT_TEMPLATE, build_tiny_qwen2_vl, make_image, prompt_text  # noqa: E402
from tokencompress.adapters import graft_compressor, graft_fastv  # noqa: E402
from tokencompress.evaluation.backends import HFBackend, Sample, generation_settings  # noqa: E402
from tokencompress.evaluation.lmms_model import TokenCompressLMM  # noqa: E402
from tokencompress.evaluation.local_task import write_local_task  # noqa: E402
from tokencompress.evaluation.model_args import parse_model_args  # noqa: E402
from tokencompress.evaluation.task_functions import SKIPPED_ANSWER  # noqa: E402
from tokencompress.evaluation.visuals import UnreadableImage  # noqa: E402
from tokencompress.registry import create_compressor  # noqa: E402

SYNTHETIC = "tokencompress_synthetic"
TINY_TASK = "tokencompress_tiny_vqa"
MAX_NEW_TOKENS = 8  # the local tasks' default answer length, as the recipe's evaluation
CLASS_PATH = "tokencompress.evaluation.lmms_model.TokenCompressLMM"

# A few dozen stage-2 steps: the tiny LLM learns to answer with a word of the answer
# vocabulary (mostly the prior, not yet the picture), in well under a minute.
SIZES = DemoSizes(
    num_train=64,
    num_test=10,  # batch_size 4 gives batches of 4, 4 and 2
    stage1=("training.max_steps=2",),
    stage2=("training.max_steps=24", "training.global_batch_size=8", "training.micro_batch_size=8"),
)


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every cache in a temporary HF_HOME, the hub and datasets offline, no sockets."""
    home = tmp_path_factory.mktemp("hf_home")
    resolve_cache = getattr(lmms_task_api, "_resolve_hf_datasets_cache_dir", None)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        patch.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        # lmms-eval picks its datasets cache once per process: pick again, in HF_HOME.
        if resolve_cache is not None:
            resolve_cache.cache_clear()
        yield home
    if resolve_cache is not None:
        resolve_cache.cache_clear()


def question_of(record: dict[str, Any]) -> str:
    """The question of a LLaVA record as the recipe asks it: the first turn, no marker."""
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def run_lmms_eval(model_args: str, task_dir: Path, task: str, **kwargs: Any) -> dict[str, Any]:
    """lmms-eval's own evaluator on an included task, with the model found by name."""
    manager = lmms_tasks.TaskManager(include_path=str(task_dir), include_defaults=False)
    return evaluator.simple_evaluate(model="tokencompress", model_args=model_args, tasks=[task],
                                     task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs)


def logged_answers(samples: list[dict[str, Any]]) -> dict[str, str]:
    """{record id: the model's answer} from lmms-eval's logged samples."""
    return {sample["doc"]["id"]: sample["filtered_resps"][0] for sample in samples}


def write_tiny_task(records: list[dict[str, Any]], images: dict[str, Image.Image], out: Path) -> Path:
    """A local task of `records` whose pictures are `images` (file name: picture)."""
    folder = out / "images"
    folder.mkdir(parents=True)
    for name, image in images.items():
        image.save(folder / name)
    return write_local_task(records, folder, out / "task", task_name=TINY_TASK).parent


def record(index: int, question: str, image: str) -> dict[str, Any]:
    marker = "<image>\n" if image else ""
    return {"id": f"q{index}", "image": image, "answer": "red",
            "conversations": [{"from": "human", "value": marker + question}, {"from": "gpt", "value": "red"}]}


# Different lengths, so a batch is left-padded; one text-only question.
QUESTIONS = ("What is here?", "Which colour is the largest shape in this picture?", "Any dots?",
             "Describe the picture in one word.", "What is two plus two?", "Is it round?")
TEXT_ONLY = 4


# ------------------------------------------------------------------ FlashSloth, trained


@dataclass(frozen=True)
class TrainedFlashSloth:
    model: Path
    data: Path
    records: list[dict[str, Any]]
    task_dir: Path
    accuracy: float  # evaluate_folder's held-out accuracy
    answers: dict[str, str]  # {record id: the answer evaluate_folder scored}


@pytest.fixture(scope="module")
def flashsloth(tmp_path_factory: pytest.TempPathFactory) -> TrainedFlashSloth:
    """The demo's two stages at `SIZES`, the recipe's evaluation of the saved model (with
    the answers it scored), and the local task written from the same held-out set."""
    out = tmp_path_factory.mktemp("flashsloth")
    run_demo(out, sizes=SIZES)
    model, data = out / "stage2" / "model", out / "data"
    given: list[str] = []

    class RecordingChat(FlashSlothChat):
        """The recipe's chat, keeping every answer it gives to `evaluate`, in order."""

        def answer(self, *args: Any, **kwargs: Any) -> list[str]:
            answers = super().answer(*args, **kwargs)
            given.extend(answers)
            return answers

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe_evaluate, "FlashSlothChat", RecordingChat)
        result = recipe_evaluate.evaluate_folder(model, data / "test.json", data / "images")
    records = load_llava_json(data / "test.json")
    assert result.num_samples == len(records) == len(given) == SIZES.num_test
    assert any(given), "the trained model answers nothing: the comparisons below would be vacuous"
    task_dir = write_local_task(records, data / "images", out / "task").parent
    answers = {item["id"]: answer for item, answer in zip(records, given)}
    return TrainedFlashSloth(model, data, records, task_dir, result.accuracy, answers)


def test_entry_point_registers_the_model_with_lmms_eval() -> None:
    (entry,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "tokencompress"]
    assert entry.value == "tokencompress.evaluation.plugin:manifest"
    resolved = lmms_models.MODEL_REGISTRY_V2.resolve("tokencompress")
    assert (resolved.model_type, resolved.class_path) == ("simple", CLASS_PATH)
    assert lmms_models.get_model("tokencompress") is TokenCompressLMM
    assert "tokencompress" in lmms_models.list_available_models()


@pytest.mark.slow
def test_simple_evaluate_gives_the_recipe_evaluation_answers(flashsloth: TrainedFlashSloth) -> None:
    """Accuracy and every answer equal evaluate_folder's, at batch sizes 1 and 4."""
    for batch_size in (1, 4):
        out = run_lmms_eval(f"pretrained={flashsloth.model},batch_size={batch_size}", flashsloth.task_dir, SYNTHETIC)
        assert out["config"]["model_backend"] == f"{CLASS_PATH} (simple)"
        scores = out["results"][SYNTHETIC]
        assert scores["exact_match,none"] == pytest.approx(flashsloth.accuracy, abs=1e-12), batch_size
        assert scores["skipped,none"] == 0.0
        samples = out["samples"][SYNTHETIC]
        assert [s["doc_id"] for s in samples] == list(range(SIZES.num_test))
        assert logged_answers(samples) == flashsloth.answers, f"batch_size={batch_size}"


@pytest.mark.slow
def test_cli_writes_the_recipe_evaluation_results(flashsloth: TrainedFlashSloth, offline: Path,
                                                  tmp_path: Path) -> None:
    output = tmp_path / "results"
    env = {**os.environ, "HF_HOME": str(offline), "HF_DATASETS_CACHE": str(offline / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "tokencompress",
               # batch_size in model_args wins over the CLI's own --batch_size, which lmms-eval always passes
               "--model_args", f"pretrained={flashsloth.model},dtype=float32,on_bad_image=stop,batch_size=4",
               "--batch_size", "1",
               "--tasks", SYNTHETIC, "--include_path", str(flashsloth.task_dir),
               "--output_path", str(output), "--log_samples"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    (results_file,) = output.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_backend"] == f"{CLASS_PATH} (simple)"
    assert results["results"][SYNTHETIC]["exact_match,none"] == pytest.approx(flashsloth.accuracy, abs=1e-12)
    assert results["n-samples"][SYNTHETIC]["effective"] == SIZES.num_test
    (samples_file,) = output.rglob(f"*_samples_{SYNTHETIC}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    # The file logs doc ids and the answer, not the documents: the id is the record's index.
    answers = {flashsloth.records[s["doc_id"]]["id"]: s["filtered_resps"] for s in samples}
    assert answers == flashsloth.answers


# ------------------------------------------------------ tiny Hugging Face models, grafted


@dataclass(frozen=True)
class TinyModel:
    family: str  # "llava" or "qwen2_vl"
    folder: Path  # model and processor, saved
    task_dir: Path  # a local task of QUESTIONS about pictures that fit the model
    image_folder: Path
    records: list[dict[str, Any]]


def save_tiny_model(family: str, folder: Path) -> None:
    """A seeded tiny random model of `family` and a processor AutoProcessor loads back."""
    if family == "llava":
        model, processor = build_tiny_llava("qwen2", "siglip")
    else:
        model, image_only = build_tiny_qwen2_vl("qwen2_vl")
        # The builder's image-only processor class is not one AutoProcessor knows.
        video = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
        processor = Qwen2VLProcessor(image_processor=image_only.image_processor, tokenizer=image_only.tokenizer,
                                     video_processor=video, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def pictures(family: str, count: int, seed: int) -> list[Image.Image]:
    """Random pictures of the size each model takes as is: 56x56 (LLaVA's 8x8 patches of
    7 px), 48x64 (Qwen2-VL: a 6x8 grid of merged 8 px tokens)."""
    if family == "llava":
        return make_images(count, size=56, seed=seed)
    return [make_image(48, 64, seed=seed + index) for index in range(count)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    models = {}
    for family in ("llava", "qwen2_vl"):
        out = tmp_path_factory.mktemp(family)
        save_tiny_model(family, out / "model")
        names = {index: "" if index == TEXT_ONLY else f"picture_{index}.png" for index in range(len(QUESTIONS))}
        records = [record(index, question, names[index]) for index, question in enumerate(QUESTIONS)]
        images = dict(zip([name for name in names.values() if name], pictures(family, len(QUESTIONS) - 1, seed=1)))
        task_dir = write_tiny_task(records, images, out)
        models[family] = TinyModel(family, out / "model", task_dir, out / "images", records)
    return models


def load_reference_model(tiny: TinyModel, graft: Callable[[Any, Any], Any] | None = None) -> tuple[Any, Any]:
    """The saved model and processor, loaded with their own classes, grafted by `graft`."""
    model_class = LlavaForConditionalGeneration if tiny.family == "llava" else Qwen2VLForConditionalGeneration
    model = model_class.from_pretrained(tiny.folder).eval()
    processor = AutoProcessor.from_pretrained(tiny.folder)
    if graft is not None:
        graft(model, processor)
    return model, processor


def prompt_of(family: str, question: str, num_images: int) -> str:
    """The prompt written by hand: LLaVA's plain one (the tiny processor has no chat
    template), Qwen's chat template."""
    if family == "llava":
        return f"USER: {'<image>' * num_images}\n{question} ASSISTANT:"
    return prompt_text(num_images, question)


@torch.no_grad()
def direct_answer(family: str, model: Any, processor: Any, question: str, images: list[Image.Image]) -> str:
    """The model's own greedy `generate` on one prompt (no batch, no padding)."""
    inputs = processor(images=images or None, text=[prompt_of(family, question, len(images))], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                               pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def open_picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def reference_answers(tiny: TinyModel, graft: Callable[[Any, Any], Any] | None) -> dict[str, str]:
    """{record id: direct_answer} for every question of the tiny model's task."""
    model, processor = load_reference_model(tiny, graft)
    answers = {}
    for item in tiny.records:
        images = [open_picture(tiny.image_folder / item["image"])] if item["image"] else []
        answers[item["id"]] = direct_answer(tiny.family, model, processor, question_of(item), images)
    return answers


@pytest.fixture(scope="module")
def plain_answers(tiny_models: dict[str, TinyModel]) -> dict[str, dict[str, str]]:
    """{family: `reference_answers` of the ungrafted model}."""
    return {family: reference_answers(tiny, None) for family, tiny in tiny_models.items()}


def tome(model: Any, processor: Any) -> Any:
    return graft_compressor(model, create_compressor("tome", num_tokens=9), processor=processor)


def fastv(model: Any, processor: Any) -> Any:
    return graft_fastv(model, layer=2, keep=0.5)


def avgpool(model: Any, processor: Any) -> Any:
    return graft_compressor(model, create_compressor("avgpool", window=2), processor=processor)


# case: (family, model_args grafting it, the same graft by hand)
GRAFTED = {
    "llava-tome": ("llava", "compressor=tome,compressor.num_tokens=9", tome),
    "llava-fastv": ("llava", "fastv_layer=2,fastv_keep=0.5", fastv),
    "qwen2_vl-avgpool": ("qwen2_vl", "compressor=avgpool,compressor.window=2", avgpool),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", GRAFTED)
def test_grafted_model_through_simple_evaluate_answers_as_its_own_generate(
    case: str, tiny_models: dict[str, TinyModel], plain_answers: dict[str, dict[str, str]]
) -> None:
    """Garbage answers (random weights), but the model's own: equal at batch sizes 1 and
    4 (left padding, a text-only question in a batch) and to `generate` called directly."""
    family, model_args, graft = GRAFTED[case]
    tiny = tiny_models[family]
    answers = {}
    for batch_size in (1, 4):
        out = run_lmms_eval(f"pretrained={tiny.folder},{model_args}", tiny.task_dir, TINY_TASK, batch_size=batch_size)
        answers[batch_size] = logged_answers(out["samples"][TINY_TASK])
        assert out["results"][TINY_TASK]["skipped,none"] == 0.0
    expected = reference_answers(tiny, graft)
    assert answers[1] == answers[4] == expected
    assert any(expected.values())
    # The graft took effect: the ungrafted model answers some question otherwise.
    plain = plain_answers[family]
    assert any(expected[key] != plain[key] for key in expected), (expected, plain)


# case: (family, model_args as a dict, the same graft by hand)
DIRECT = {
    "llava": ("llava", {}, None),
    "llava-tome": ("llava", {"compressor": "tome", "compressor.num_tokens": 9}, tome),
    "qwen2_vl-avgpool": ("qwen2_vl", {"compressor": "avgpool", "compressor.window": 2}, avgpool),
}


@pytest.mark.parametrize("case", DIRECT)
def test_backend_answers_text_only_and_two_image_questions_in_one_batch(
    case: str, tiny_models: dict[str, TinyModel]
) -> None:
    family, model_args, graft = DIRECT[case]
    tiny = tiny_models[family]
    backend = HFBackend(parse_model_args({"pretrained": str(tiny.folder), **model_args}))
    first, second = pictures(family, 2, seed=7)
    samples = [
        Sample("Which of the two pictures is brighter?", [first, second]),
        Sample("What is two plus two?", []),
        Sample("<image>\nWhat is here?", [second]),  # a task's marker: the backend places images itself
    ]
    settings = generation_settings({"until": [], "max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}, 32)
    answers = backend.generate(samples, settings)

    model, processor = load_reference_model(tiny, graft)
    expected = [
        direct_answer(family, model, processor, "Which of the two pictures is brighter?", [first, second]),
        direct_answer(family, model, processor, "What is two plus two?", []),
        direct_answer(family, model, processor, "What is here?", [second]),
    ]
    assert answers == expected
    assert all(expected), expected


def reference_loglikelihood(family: str, model: Any, processor: Any, question: str, images: list[Image.Image],
                            continuation: str) -> tuple[float, bool]:
    """By hand: the prompt's tokens, then the continuation's; the sum of log-softmax of
    the logits at the positions before each continuation token, and whether each is the argmax."""
    inputs = processor(images=images or None, text=[prompt_of(family, question, len(images))], return_tensors="pt")
    targets = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    input_ids = torch.cat([inputs["input_ids"][0], targets])[None]
    extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # Qwen2-VL: which tokens are image tokens; the continuation's are text (0)
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"][0], torch.zeros_like(targets)])[None]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra).logits[0]
    predicting = logits[-len(targets) - 1:-1].double()  # position i predicts token i + 1
    log_probs = torch.log_softmax(predicting, dim=-1)
    total = sum(float(log_probs[row, token]) for row, token in enumerate(targets.tolist()))
    return total, predicting.argmax(dim=-1).tolist() == targets.tolist()


CANDIDATES = ("What colour is it?", "Is it round?", "Why?", "Name it.", "a", "Say something.", "Count the dots.")


def greedy_case(family: str, model: Any, processor: Any, images: list[Image.Image]) -> tuple[str, str] | None:
    """(question, the model's greedy next token as text) for the first of CANDIDATES whose
    greedy token is text that encodes back to it, or None. (A random model's favourite
    token is often one byte of a longer UTF-8 character, which no text encodes to alone.)"""
    tokenizer = processor.tokenizer
    for question in CANDIDATES:
        inputs = processor(images=images or None, text=[prompt_of(family, question, len(images))],
                           return_tensors="pt")
        with torch.no_grad():
            token = int(model(**inputs).logits[0, -1].argmax())
        text = tokenizer.decode([token])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == [token]:
            return question, text
    return None


@pytest.mark.parametrize("case", DIRECT)
def test_loglikelihood_is_the_continuation_log_probability(case: str, tiny_models: dict[str, TinyModel]) -> None:
    """Through the lmms-eval model's `loglikelihood` (lmms-eval's request tuples), against
    the model's logits; with and without a picture; greedy and not."""
    from lmms_eval.api.instance import Instance

    family, model_args, graft = DIRECT[case]
    tiny = tiny_models[family]
    arg_string = ",".join(f"{key}={value}" for key, value in {"pretrained": tiny.folder, **model_args}.items())
    lm = TokenCompressLMM.create_from_arg_string(arg_string, {"batch_size": None, "device": None})
    model, processor = load_reference_model(tiny, graft)

    picture = pictures(family, 1, seed=3)[0]
    question = "What colour is it?"
    docs = [{"pictures": [picture]}, {"pictures": []}]
    lm.task_dict = {"mc": {"test": docs}}
    cases = [(0, question, " red"), (0, question, "blue sky"), (1, question, " red")]
    for doc_id, doc in enumerate(docs):
        greedy = greedy_case(family, model, processor, doc["pictures"])
        cases += [] if greedy is None else [(doc_id, *greedy)]
    requests = [
        Instance("loglikelihood", (context, continuation, lambda doc: doc["pictures"], doc_id, "mc", "test"),
                 idx=index, metadata={"task": "mc", "doc_id": doc_id, "repeats": 1})
        for index, (doc_id, context, continuation) in enumerate(cases)
    ]
    scores = lm.loglikelihood(requests)

    expected = [reference_loglikelihood(family, model, processor, context, docs[doc_id]["pictures"], continuation)
                for doc_id, context, continuation in cases]
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    assert [greedy for _, greedy in expected[:3]] == [False, False, False] and all(g for _, g in expected[3:])
    assert len(cases) > 3, "no greedy continuation found: the is-greedy flag would go untested"
    for (score, _), (reference, _) in zip(scores, expected):
        assert score == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert all(score < 0 for score, _ in scores)


# ------------------------------------------------------------------- bad model_args


@pytest.fixture(scope="module")
def fake_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with only the JSON that model_args are checked against (no weights)."""
    root = tmp_path_factory.mktemp("fake_models")
    files = {
        "llava": ("config.json", {"model_type": "llava"}),
        "bert": ("config.json", {"model_type": "bert"}),
        "flashsloth": ("flashsloth_config.json", {"config": {"compressor": "sap"}}),
    }
    folders = {}
    for name, (file, content) in files.items():
        folders[name] = root / name
        folders[name].mkdir()
        (folders[name] / file).write_text(json.dumps(content))
    folders["empty"] = root / "empty"
    folders["empty"].mkdir()
    return folders


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way the backends load a model or processor fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ModelLoaded(f"a model was loaded: {args!r}")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", refuse)
    # The recipe as installed (what the backend imports) and as a checkout: two modules.
    monkeypatch.setattr(installed_flashsloth_model.FlashSloth, "from_pretrained", refuse)
    monkeypatch.setattr(checkout_flashsloth_model.FlashSloth, "from_pretrained", refuse)


# (model_args with {folder} names from fake_folders, lmms-eval's extra config, what the error names)
BAD_MODEL_ARGS = {
    "unknown compressor": ("pretrained={llava},compressor=tokenmerge", {}, "compressor='tokenmerge'"),
    "compressor argument missing": ("pretrained={llava},compressor=tome", {}, "compressor='tome'"),
    "unknown compressor argument": ("pretrained={llava},compressor=tome,compressor.num_token=9", {},
                                    r"compressor\.num_token=9"),
    "compressor argument alone": ("pretrained={llava},compressor.num_tokens=9", {}, r"compressor\.\*"),
    "unknown key": ("pretrained={llava},temperature=0.2", {}, "temperature"),
    "no pretrained": ("compressor=tome,compressor.num_tokens=9", {}, "pretrained"),
    "bert folder": ("pretrained={bert}", {}, "pretrained=.*'bert'"),
    "folder without config": ("pretrained={empty}", {}, "pretrained=.*neither"),
    "missing folder": ("pretrained={empty}/missing", {}, "pretrained=.*not a folder"),
    "compressor and graft": ("pretrained={llava},compressor=tome,compressor.num_tokens=9,graft={empty}", {},
                             "graft=.*compressor='tome'"),
    "graft on FlashSloth": ("pretrained={flashsloth},graft={empty}", {}, "graft="),
    "fastv_layer alone": ("pretrained={llava},fastv_layer=2", {}, "fastv_layer=2"),
    "fastv_keep alone": ("pretrained={llava},fastv_keep=0.5", {}, "fastv_keep=0.5"),
    "fastv_layer zero": ("pretrained={llava},fastv_layer=0,fastv_keep=0.5", {}, "fastv_layer"),
    "compressor on SAP FlashSloth": ("pretrained={flashsloth},compressor=tome,compressor.num_tokens=9", {},
                                     "compressor='tome'.*'sap'"),
    "batch_size zero": ("pretrained={llava}", {"batch_size": "0"}, "batch_size"),
    "batch_size auto": ("pretrained={llava}", {"batch_size": "auto"}, "batch_size"),
    "dtype": ("pretrained={llava},dtype=float64", {}, "dtype"),
    "on_bad_image": ("pretrained={llava},on_bad_image=ignore", {}, "on_bad_image"),
    "chat_template": ("pretrained={llava},chat_template=vicuna", {}, "chat_template"),
    "max_new_tokens": ("pretrained={llava},max_new_tokens=0", {}, "max_new_tokens"),
}


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("case", BAD_MODEL_ARGS)
def test_bad_model_args_fail_before_any_model_loads(case: str, fake_folders: dict[str, Path]) -> None:
    """As lmms-eval creates the model: `create_from_arg_string(model_args, {batch_size, device})`."""
    model_args, extra, names = BAD_MODEL_ARGS[case]
    model_class = lmms_models.get_model("tokencompress")
    with pytest.raises(ValueError, match=names):
        model_class.create_from_arg_string(model_args.format(**fake_folders), {"batch_size": None, "device": None,
                                                                               **extra})


@pytest.mark.usefixtures("no_loading")
def test_good_model_args_reach_the_loader(fake_folders: dict[str, Path]) -> None:
    """The control of the test above: with nothing wrong, loading is what fails."""
    model_class = lmms_models.get_model("tokencompress")
    for model_args in ("pretrained={llava},compressor=tome,compressor.num_tokens=9,batch_size=4",
                       "pretrained={llava},fastv_layer=2,fastv_keep=0.5,dtype=bfloat16,on_bad_image=skip",
                       "pretrained={flashsloth}"):
        with pytest.raises(ModelLoaded):
            model_class.create_from_arg_string(model_args.format(**fake_folders), {"batch_size": None, "device": None})


@pytest.mark.usefixtures("no_loading")
def test_simple_evaluate_reports_a_bad_model_arg(fake_folders: dict[str, Path],
                                                 tiny_models: dict[str, TinyModel]) -> None:
    with pytest.raises(ValueError, match=r"unknown model_args \['compresor'\]"):
        run_lmms_eval(f"pretrained={fake_folders['llava']},compresor=tome", tiny_models["llava"].task_dir, TINY_TASK)


# ------------------------------------------------------------------ unreadable images

BROKEN = 2  # the sample whose picture is overwritten with garbage


@pytest.fixture
def broken_task(tiny_models: dict[str, TinyModel], tmp_path: Path) -> tuple[Path, Path]:
    """The tiny LLaVA's task, written again, then one picture file overwritten with
    bytes no image decoder reads: (task folder, the broken file)."""
    tiny = tiny_models["llava"]
    names = [item["image"] for item in tiny.records if item["image"]]
    task_dir = write_tiny_task(tiny.records, {name: open_picture(tiny.image_folder / name) for name in names},
                               tmp_path)
    broken = tmp_path / "images" / tiny.records[BROKEN]["image"]
    broken.write_bytes(b"\x00garbage, not a picture" * 8)
    return task_dir, broken


def test_unreadable_image_stops_the_run_naming_the_sample_and_file(
    broken_task: tuple[Path, Path], tiny_models: dict[str, TinyModel]
) -> None:
    task_dir, broken = broken_task
    with pytest.raises(UnreadableImage) as info:
        run_lmms_eval(f"pretrained={tiny_models['llava'].folder},on_bad_image=stop", task_dir, TINY_TASK,
                      batch_size=4)
    record_id = tiny_models["llava"].records[BROKEN]["id"]
    assert (info.value.task, info.value.doc_id, info.value.record_id, Path(info.value.visual)) == (
        TINY_TASK, BROKEN, record_id, broken)
    assert f"sample {BROKEN} (id {record_id!r})" in str(info.value) and str(broken) in str(info.value)


def test_unreadable_image_skipped_and_counted(broken_task: tuple[Path, Path], tiny_models: dict[str, TinyModel],
                                              plain_answers: dict[str, dict[str, str]]) -> None:
    task_dir, _ = broken_task
    tiny = tiny_models["llava"]
    out = run_lmms_eval(f"pretrained={tiny.folder},on_bad_image=skip", task_dir, TINY_TASK, batch_size=4)
    assert out["results"][TINY_TASK]["skipped,none"] == pytest.approx(1 / len(QUESTIONS), abs=1e-12)
    answers = logged_answers(out["samples"][TINY_TASK])
    broken_id = tiny.records[BROKEN]["id"]
    assert answers[broken_id] == SKIPPED_ANSWER
    expected = plain_answers["llava"]
    assert {key: value for key, value in answers.items() if key != broken_id} == {
        key: value for key, value in expected.items() if key != broken_id}
