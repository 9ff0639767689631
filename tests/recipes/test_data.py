"""Data sets on disk, the collator, and the resumable sharded sampler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from recipes.flashsloth.data import (
    DataCollator,
    LlavaDataset,
    ResumableSampler,
    SampleError,
    load_llava_json,
)
from recipes.flashsloth.image_processing import FlashSlothHDProcessor, SiglipProcessor
from recipes.flashsloth.template import IGNORE_INDEX, ConversationTemplate, PlainTemplate
from tokencompress.adapters.prompt import INSTRUCTION_MAP_KEY

N_IMAGE, N_QUERY = 9, 3
TINY_IMAGE_SIZE = 48  # the synthetic_dir fixture's picture size (checked below)


@pytest.fixture(scope="module")
def token_ids(tiny_tokenizer):
    return tiny_tokenizer.convert_tokens_to_ids("<image>"), tiny_tokenizer.convert_tokens_to_ids("<query>")


@pytest.fixture(scope="module")
def chat_template(tiny_tokenizer, token_ids):
    image, query = token_ids
    return ConversationTemplate(tiny_tokenizer, image_token_id=image, num_image_tokens=N_IMAGE,
                                query_token_ids=[query] * N_QUERY)


@pytest.fixture(scope="module")
def instruct(synthetic_dir, chat_template):
    return LlavaDataset(synthetic_dir / "instruct.json", synthetic_dir / "images",
                        template=chat_template, image_processor=SiglipProcessor(TINY_IMAGE_SIZE))


@pytest.fixture
def data_copy(synthetic_dir, tmp_path) -> Path:
    """A private copy of the synthetic data set, safe to damage."""
    return Path(shutil.copytree(synthetic_dir, tmp_path / "data"))


# ----------------------------------------------------------------------------- data sets


def test_instruct_samples_hold_the_encoded_conversation_and_image(synthetic_dir, instruct, chat_template):
    assert json.loads((synthetic_dir / "info.json").read_text())["image_size"] == TINY_IMAGE_SIZE
    records = json.loads((synthetic_dir / "instruct.json").read_text())
    assert len(instruct) == len(records) == 10
    processor = SiglipProcessor(TINY_IMAGE_SIZE)
    for index, record in enumerate(records):
        sample = instruct[index]
        assert sample["id"] == record["id"]
        has_image = "image" in record
        expected = chat_template.encode(record["conversations"], num_images=int(has_image))
        assert sample["prompt"] == expected
        if has_image:
            image = Image.open(synthetic_dir / "images" / record["image"])
            assert sample["pixel_values"].shape == (1, 1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
            assert torch.equal(sample["pixel_values"][0], processor(image))
        else:
            assert sample["pixel_values"] is None  # text-only samples work


def test_pretrain_with_plain_template_and_hd_views(synthetic_dir, tiny_tokenizer, token_ids):
    template = PlainTemplate(tiny_tokenizer, image_token_id=token_ids[0], num_image_tokens=N_IMAGE)
    data = LlavaDataset(synthetic_dir / "pretrain.json", synthetic_dir / "images", template=template,
                        image_processor=FlashSlothHDProcessor(16))
    sample = data[0]
    assert sample["pixel_values"].shape == (1, 5, 3, 16, 16)
    caption = json.loads((synthetic_dir / "pretrain.json").read_text())[0]["conversations"][1]["value"]
    assert tiny_tokenizer.decode(sample["prompt"].input_ids[N_IMAGE:]) == caption + "\n"


def test_missing_image_names_the_file_and_sample(data_copy, chat_template):
    records = json.loads((data_copy / "instruct.json").read_text())
    index = next(i for i, r in enumerate(records) if "image" in r)
    (data_copy / "images" / records[index]["image"]).unlink()
    data = LlavaDataset(data_copy / "instruct.json", data_copy / "images", template=chat_template,
                        image_processor=SiglipProcessor(TINY_IMAGE_SIZE))
    with pytest.raises(SampleError) as info:
        data[index]
    message = str(info.value)
    assert repr(records[index]["id"]) in message and records[index]["image"] in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file_and_sample(data_copy, chat_template, damage):
    records = json.loads((data_copy / "instruct.json").read_text())
    index = next(i for i, r in enumerate(records) if "image" in r)
    path = data_copy / "images" / records[index]["image"]
    path.write_bytes(b"not a picture" if damage == "garbage" else path.read_bytes()[:100])
    data = LlavaDataset(data_copy / "instruct.json", data_copy / "images", template=chat_template,
                        image_processor=SiglipProcessor(TINY_IMAGE_SIZE))
    with pytest.raises(SampleError, match=f"sample {records[index]['id']!r}.*cannot read image.*{path.name}"):
        data[index]


def test_skip_is_explicit_and_lists_what_it_skipped(data_copy, chat_template):
    records = json.loads((data_copy / "instruct.json").read_text())
    index = next(i for i, r in enumerate(records) if "image" in r)
    (data_copy / "images" / records[index]["image"]).write_bytes(b"broken")
    data = LlavaDataset(data_copy / "instruct.json", data_copy / "images", template=chat_template,
                        image_processor=SiglipProcessor(TINY_IMAGE_SIZE), on_bad_image="skip", progress=False)
    assert len(data) == len(records) - 1
    assert [(s.index, s.sample_id) for s in data.skipped] == [(index, records[index]["id"])]
    assert records[index]["id"] not in [data[i]["id"] for i in range(len(data))]
    with pytest.raises(ValueError, match="on_bad_image must be 'raise' or 'skip', got 'ignore'"):
        LlavaDataset(data_copy / "instruct.json", data_copy / "images", template=chat_template,
                     image_processor=SiglipProcessor(TINY_IMAGE_SIZE), on_bad_image="ignore")


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ('{"id": 1}', "expected a JSON list"),
        ('[{"id": "a", "conversations": []}]',
         "sample 'a' \\(index 0\\): 'conversations' must be a non-empty list"),
        ('[{"conversations": [{"from": "human", "value": "x"}], "image": 3}]',
         "sample '#0'.*'image' must be a path"),
        ('[3]', "expected an object, got int"),
    ],
)
def test_bad_json_names_the_file_and_sample(tmp_path, content, match):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(SampleError, match=match) as info:
        load_llava_json(path)
    assert str(path) in str(info.value)
    with pytest.raises(SampleError, match="does not exist"):
        load_llava_json(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- collator


def test_collator_pads_right_with_masks_labels_and_images(instruct, tiny_tokenizer):
    records = instruct.records
    order = sorted(range(len(records)), key=lambda i: "image" in records[i])[:3]  # text-only first
    samples = [instruct[i] for i in order]
    assert samples[0]["pixel_values"] is None
    batch = DataCollator(tiny_tokenizer.pad_token_id)(samples)
    lengths = [len(s["prompt"]) for s in samples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        prompt = sample["prompt"]
        assert batch["input_ids"][row, :length].tolist() == prompt.input_ids
        assert batch["input_ids"][row, length:].eq(tiny_tokenizer.pad_token_id).all()
        assert batch["labels"][row, :length].tolist() == prompt.labels
        assert batch["labels"][row, length:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert batch[INSTRUCTION_MAP_KEY][row, :length].tolist() == prompt.instruction_map()
    with_images = [row for row, s in enumerate(samples) if s["pixel_values"] is not None]
    assert batch["image_sample_index"].tolist() == with_images
    assert torch.equal(batch["pixel_values"], torch.cat([samples[r]["pixel_values"] for r in with_images]))
    assert batch["ids"] == [s["id"] for s in samples]


def test_collator_left_padding_for_generation(instruct, tiny_tokenizer):
    samples = [instruct[0], instruct[1]]
    batch = DataCollator(tiny_tokenizer.pad_token_id, padding_side="left")(samples)
    width = batch["input_ids"].shape[1]
    for row, sample in enumerate(samples):
        length = len(sample["prompt"])
        assert batch["input_ids"][row, width - length:].tolist() == sample["prompt"].input_ids
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length


def test_collator_without_images_and_errors(instruct, tiny_tokenizer):
    text_only = [instruct[i] for i in range(len(instruct)) if instruct[i]["pixel_values"] is None]
    batch = DataCollator(tiny_tokenizer.pad_token_id)(text_only)
    assert batch["pixel_values"] is None and batch["image_sample_index"].shape == (0,)
    with pytest.raises(ValueError, match="empty list"):
        DataCollator(0)([])
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        DataCollator(0, padding_side="middle")


# ----------------------------------------------------------------------------- sampler


def drain(sampler: ResumableSampler, count: int | None = None) -> list[int]:
    """Take ``count`` indices (all if None), marking each as consumed."""
    taken = []
    for index in sampler:
        taken.append(index)
        sampler.mark_consumed(1)
        if count is not None and len(taken) == count:
            break
    return taken


def test_order_is_a_seeded_permutation_per_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    first = list(a)
    assert first == list(b) and sorted(first) == list(range(50)) and first != list(range(50))
    assert first == torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("size, world", [(20, 4), (23, 4), (7, 3)])
def test_ranks_take_disjoint_slices_of_the_one_process_order(size, world):
    single = ResumableSampler(size, seed=1).global_order()[: size - size % world]
    samplers = [ResumableSampler(size, seed=1, rank=r, world_size=world) for r in range(world)]
    assert [len(s) for s in samplers] == [size // world] * world
    shards = [list(s) for s in samplers]
    assert all(len(s) == size // world for s in shards)
    assert set().union(*map(set, shards)) == set(single) and sum(map(len, shards)) == len(set(single))
    # Interleaving the ranks step by step gives back the one-process order, so each global
    # batch of world * b samples is the same set one process would see with that batch.
    interleaved = [shard[i] for i in range(size // world) for shard in shards]
    assert interleaved == single


def test_without_drop_last_the_tail_is_padded_by_wrapping():
    samplers = [ResumableSampler(7, seed=0, rank=r, world_size=3, drop_last=False) for r in range(3)]
    assert [len(s) for s in samplers] == [3, 3, 3]
    shards = [list(s) for s in samplers]
    order = ResumableSampler(7, seed=0).global_order()
    assert [i for step in zip(*shards) for i in step] == order + order[:2]


def test_resume_continues_exactly_where_it_stopped():
    uninterrupted = ResumableSampler(30, seed=9)
    expected = list(uninterrupted)
    sampler = ResumableSampler(30, seed=9)
    head = drain(sampler, 11)
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = ResumableSampler(30, seed=9)
    resumed.load_state_dict(state)
    assert len(resumed) == 19
    assert head + list(resumed) == expected


def test_resume_with_dataloader_prefetching_workers():
    # Workers prefetch, so the sampler hands out more than was trained on; the position
    # comes from mark_consumed, not from what was handed out.
    data = list(range(40))
    sampler = ResumableSampler(len(data), seed=2)
    loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=1, prefetch_factor=4)
    seen = []
    for step, batch in enumerate(loader):
        seen += batch.tolist()
        sampler.mark_consumed(len(batch))
        if step == 2:
            break
    state = sampler.state_dict()
    assert state["position"] == 12
    resumed = ResumableSampler(len(data), seed=2)
    resumed.load_state_dict(state)
    rest = [i for batch in DataLoader(data, batch_size=4, sampler=resumed) for i in batch.tolist()]
    assert seen + rest == ResumableSampler(len(data), seed=2).global_order()


def test_resume_on_another_world_size():
    single = ResumableSampler(24, seed=4)
    drain(single, 8)
    state = single.state_dict()
    shards = []
    for rank in range(2):
        sampler = ResumableSampler(24, seed=4, rank=rank, world_size=2)
        sampler.load_state_dict(state)
        shards.append(list(sampler))
    assert [i for step in zip(*shards) for i in step] == ResumableSampler(24, seed=4).global_order()[8:]


def test_distributed_state_records_the_global_position():
    sampler = ResumableSampler(20, seed=0, rank=1, world_size=4)
    drain(sampler, 2)
    assert sampler.state_dict()["position"] == 8


def test_set_epoch_restarts_the_epoch():
    sampler = ResumableSampler(10, seed=0)
    drain(sampler, 4)
    sampler.set_epoch(1)
    assert sampler.state_dict()["position"] == 0 and len(list(sampler)) == 10


def test_sampler_errors_are_clear():
    with pytest.raises(ValueError, match="dataset_size must be >= 1, got 0"):
        ResumableSampler(0)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank=2, world_size=2"):
        ResumableSampler(10, rank=2, world_size=2)
    sampler = ResumableSampler(10, seed=1)
    with pytest.raises(ValueError, match="goes past the samples handed out"):
        sampler.mark_consumed(1)
    other = ResumableSampler(10, seed=2)
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="dataset_size=10 but this sampler has 11"):
        ResumableSampler(11, seed=1).load_state_dict(sampler.state_dict())
    drain(sampler, 3)
    with pytest.raises(ValueError, match="position 3 is not a multiple of world_size=2"):
        ResumableSampler(10, seed=1, world_size=2).load_state_dict(sampler.state_dict())
