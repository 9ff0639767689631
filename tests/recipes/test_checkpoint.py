"""Checkpoints: round trips, atomic writes under crashes, retention, and exact resume."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import recipes.flashsloth.checkpoint as checkpoint_module
from recipes.flashsloth.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from recipes.flashsloth.data import ResumableSampler
from recipes.flashsloth.schedule import WarmupCosineSchedule


def assert_same_tree(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_round_trip_of_model_and_any_training_state(tmp_path):
    model_state = {
        "w": torch.randn(3, 4),
        "b16": torch.randn(5).to(torch.bfloat16),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(2.5),
    }
    state = {
        "step_info": {"epoch": 2, "lr": 1.5e-5, "nan": float("nan"), "inf": float("inf"), "flag": True},
        "by_int": {0: {"exp_avg": torch.ones(2)}, 7: {"step": torch.tensor(3.0)}},
        "tuple": (1, "a", (2.0, None)),
        "bytes": b"\x00\xffraw",
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "__tagged_looking_key__": [1, 2],
        "empty": {},
    }
    path = save_checkpoint(tmp_path, 12, model_state=model_state, training_state=state)
    assert path == tmp_path / "step_00000012"
    loaded = load_checkpoint(path)
    assert loaded.step == 12 and loaded.path == path
    assert_same_tree(loaded.model_state, model_state)
    assert_same_tree(loaded.training_state, state)


def test_tied_weights_and_views_are_saved(tmp_path):
    shared = torch.randn(4, 4)
    state = {"embed": shared, "lm_head": shared, "first_row": shared[0], "t": shared.t()}
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, model_state=state)).model_state
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)


def test_unsupported_values_name_their_place(tmp_path):
    with pytest.raises(TypeError, match="cannot store a set at 'sampler/seen'"):
        save_checkpoint(tmp_path, 1, model_state={}, training_state={"sampler": {"seen": {1, 2}}})
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(TypeError, match="state\\['w'\\] is a list, not a tensor"):
        save_checkpoint(tmp_path, 1, model_state={"w": [1.0]})


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)},
                           training_state={"rng": capture_rng_state()})

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "training_state.json", "training_state.safetensors"]
    json.loads((path / "training_state.json").read_text())  # plain JSON


@pytest.mark.parametrize("crash_in", ["model_file", "state_file", "rename"])
def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    good = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, 1, model_state=good, training_state={"step": 1})
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def crashing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        target = 1 if crash_in == "model_file" else 2
        if calls["n"] == target:
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)  # a partial file, then the process "dies"
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    def crashing_replace(src, dst):
        raise OSError("power cut")

    if crash_in == "rename":
        monkeypatch.setattr(checkpoint_module.os, "replace", crashing_replace)
    else:
        monkeypatch.setattr(checkpoint_module, "save_file", crashing_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model_state={"w": torch.zeros(4)}, training_state={"step": 2})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # nothing half-written left
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded.model_state["w"], good["w"]) and loaded.training_state == {"step": 1}


def test_stale_temporaries_from_a_killed_process_are_ignored_then_removed(tmp_path):
    save_checkpoint(tmp_path, 3, model_state={"w": torch.ones(1)})
    stale = tmp_path / ".tmp-step_00000004-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step_00000009").mkdir()  # no training_state.json: not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"
    save_checkpoint(tmp_path, 4, model_state={"w": torch.ones(1)})
    assert not stale.exists()


def test_retention_keeps_the_last_k_by_step_number(tmp_path):
    for step in (8, 9, 10, 11):  # 10 after 9: numeric, not lexical, order
        save_checkpoint(tmp_path, step, model_state={"w": torch.full((1,), float(step))}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000011"]
    assert load_checkpoint(tmp_path).step == 11


def test_saving_a_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, model_state={"w": torch.zeros(1)})
    save_checkpoint(tmp_path, 5, model_state={"w": torch.ones(1)})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    assert load_checkpoint(tmp_path).model_state["w"].item() == 1.0


def test_resolve_checkpoint(tmp_path):
    step = save_checkpoint(tmp_path / "run", 2, model_state={})
    assert resolve_checkpoint(tmp_path / "run") == step == resolve_checkpoint(step)
    assert latest_checkpoint(tmp_path / "nowhere") is None
    with pytest.raises(FileNotFoundError, match="is not a checkpoint and holds none"):
        resolve_checkpoint(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        save_checkpoint(tmp_path, -1, model_state={})
    with pytest.raises(ValueError, match="keep_last must be >= 1 or None, got 0"):
        save_checkpoint(tmp_path, 1, model_state={}, keep_last=0)


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = save_checkpoint(tmp_path, 1, model_state={}, training_state={"rng": state})
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(load_checkpoint(path).training_state["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


# ----------------------------------------------------------------------------- exact resume

NUM_SAMPLES, BATCH, EPOCHS = 24, 4, 3
TOTAL_STEPS = NUM_SAMPLES // BATCH * EPOCHS


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 4, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def train(checkpoint_dir, *, stop_after: int | None = None, resume: bool = False):
    """A miniature train loop with the recipe's parts; returns (losses, model)."""
    # A different init and global RNG for the resumed run: only the checkpoint may matter.
    torch.manual_seed(1000 if resume else 0)
    random.seed(1000 if resume else 0)
    np.random.seed(1000 if resume else 0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = WarmupCosineSchedule(optimizer, total_steps=TOTAL_STEPS, warmup_ratio=0.2)
    sampler = ResumableSampler(NUM_SAMPLES, seed=7)
    # The loader's own generator: creating an iterator must not draw from the global RNG,
    # or a resumed run (new iterator mid-epoch) would shift every later dropout mask.
    loader = DataLoader(dataset(), batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    step, start_epoch = 0, 0
    if resume:
        loaded = load_checkpoint(checkpoint_dir)
        model.load_state_dict(loaded.model_state)
        optimizer.load_state_dict(loaded.training_state["optimizer"])
        schedule.load_state_dict(loaded.training_state["scheduler"])
        sampler.load_state_dict(loaded.training_state["sampler"])
        restore_rng_state(loaded.training_state["rng"])
        step, start_epoch = loaded.step, sampler.epoch

    losses = []
    for epoch in range(start_epoch, EPOCHS):
        if not (resume and epoch == start_epoch):
            sampler.set_epoch(epoch)
        for x, y in loader:
            # Every RNG the recipe might use feeds the loss: torch (dropout, noise), Python, NumPy.
            noise = 0.01 * torch.randn_like(x) + 0.01 * random.random() + 0.01 * float(np.random.rand())
            loss = nn.functional.mse_loss(model(x + noise), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            sampler.mark_consumed(len(x))
            step += 1
            losses.append(loss.item())
            if step == stop_after:
                save_checkpoint(
                    checkpoint_dir, step, model_state=model.state_dict(), keep_last=1,
                    training_state={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": schedule.state_dict(),
                        "sampler": sampler.state_dict(),
                        "rng": capture_rng_state(),
                    },
                )
                return losses, model
    return losses, model


@pytest.mark.parametrize("stop_after", [1, 8, 12, 17])  # mid-epoch, epoch boundary, last step
def test_killed_and_resumed_run_matches_the_uninterrupted_run(tmp_path, stop_after):
    reference_losses, reference_model = train(tmp_path / "unused")
    assert len(reference_losses) == TOTAL_STEPS

    head, _ = train(tmp_path / "run", stop_after=stop_after)  # "killed" after this step
    tail, resumed_model = train(tmp_path / "run", resume=True)
    assert head + tail == reference_losses  # exactly equal, not approximately
    for (name, a), b in zip(reference_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
