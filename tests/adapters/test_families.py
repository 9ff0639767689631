"""The family table: every row's paths are where its grafts act, and the lookup's errors;
the adapters' import structure: each module imports on its own, and none in a loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch import nn

from tests.adapters.conftest import TINY, build_tiny_llava
from tests.adapters.tiny_internvl import build_tiny_internvl
from tests.adapters.tiny_llava_next import build_tiny_llava_next
from tests.adapters.tiny_llava_onevision import build_tiny_llava_onevision
from tests.adapters.tiny_qwen2_vl import TEXT_WIDTH, build_tiny_qwen2_vl
from tests.adapters.tiny_qwen3_vl import build_tiny_qwen3_vl
from tokencompress import AvgPool, EmbQ
from tokencompress.adapters import FAMILIES, graft_compressor, graft_embq, supported_model_types
from tokencompress.adapters._embq_layers import EmbQDecoderLayer
from tokencompress.adapters.families import family_of

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"


def _tiny(model_type: str) -> tuple[nn.Module, object, EmbQ]:
    llava_like = {
        "llava": lambda: build_tiny_llava("qwen2", "siglip"),
        "llava_next": build_tiny_llava_next,
        "llava_onevision": build_tiny_llava_onevision,
        "internvl": build_tiny_internvl,
    }
    if model_type in llava_like:
        model, processor = llava_like[model_type]()
        # InternVL's EmbQ reads the pixel-shuffled tile features the projector takes: 4x the tower's width
        vision_dim = TINY["vision_hidden"] * (4 if model_type == "internvl" else 1)
        return model, processor, EmbQ(TINY["text_hidden"], vision_dim, inner_dim=16, num_heads=2)
    model, processor = build_tiny_qwen3_vl() if model_type == "qwen3_vl" else build_tiny_qwen2_vl(model_type)
    return model, processor, EmbQ(TEXT_WIDTH, TEXT_WIDTH, inner_dim=16, num_heads=2)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_each_row_names_where_its_grafts_act(model_type: str) -> None:
    model, processor, embq = _tiny(model_type)
    family = family_of(model, "test")
    assert model.config.model_type in family.model_types == family_of(model.model, "test").model_types
    core = family.core(model, "test")
    assert family.core(core, "test") is core  # the core is its own core
    compressor = graft_compressor(model, AvgPool(2), processor=processor)
    assert isinstance(compressor, family.compressor_graft)
    assert core.get_submodule(family.projector) is compressor.module
    if family.graft_embq is not None:
        queries = graft_embq(model, embq, layer=2, tokenizer=processor.tokenizer)
        assert isinstance(queries, family.embq_graft)
        assert isinstance(core.get_submodule(family.decoder_layers)[1], EmbQDecoderLayer)
        queries.remove()
    else:
        assert len(core.get_submodule(family.decoder_layers)) == model.config.text_config.num_hidden_layers
    compressor.remove()
    assert not isinstance(core.get_submodule(family.projector), type(compressor.module))


def test_model_types_are_covered_once() -> None:
    types = supported_model_types()
    assert len(types) == len(set(types))
    assert {"llava", "qwen2_vl", "qwen2_5_vl", "llava_next", "llava_onevision", "internvl", "qwen3_vl"} <= set(types)
    assert all(family.positions in ("1-D", "mRoPE") for family in FAMILIES)


def test_an_unsupported_model_is_a_type_error_that_lists_the_supported_ones() -> None:
    model, _ = build_tiny_llava("phi", "siglip")
    language_model = model.model.language_model
    for call in (lambda: graft_compressor(language_model, AvgPool(2)),
                 lambda: graft_embq(language_model, EmbQ(64, 32, inner_dim=16, num_heads=2), layer=1, tokenizer=None)):
        with pytest.raises(TypeError) as error:
            call()
        message = str(error.value)
        assert "PhiModel" in message and "'phi'" in message
        for model_type in supported_model_types():
            assert repr(model_type) in message


def test_a_family_without_an_embq_graft_is_a_type_error_naming_those_with_one(monkeypatch) -> None:
    from dataclasses import replace

    from tokencompress.adapters import families

    model, processor = build_tiny_llava("qwen2", "siglip")
    without = tuple(replace(row, graft_embq=None, embq_graft=None) if row is families.LLAVA else row
                    for row in families.FAMILIES)
    monkeypatch.setattr(families, "FAMILIES", without)
    embq = EmbQ(TINY["text_hidden"], TINY["vision_hidden"], inner_dim=16, num_heads=2)
    with pytest.raises(TypeError, match=r"graft_embq does not support LLaVA models yet .*EmbQ grafts onto Qwen2-VL"):
        graft_embq(model, embq, layer=1, tokenizer=processor.tokenizer)


# -- import structure ---------------------------------------------------------------------------
def _modules() -> list[str]:
    return sorted(path.stem for path in ADAPTERS.glob("*.py") if path.stem != "__init__")


def _imports_within_adapters(module: str) -> set[str]:
    """The adapters modules `module` imports, anywhere in it (in functions, under TYPE_CHECKING)."""
    tree = ast.parse((ADAPTERS / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import name
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokencompress.adapters."):
            found.add(node.module.split(".")[2])
    return found & set(_modules())


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (loop := visit(target, path + [target])):
                return loop
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (loop := visit(start, [start])):
            return loop
    return None


def test_no_two_adapters_modules_import_each_other() -> None:
    graph = {module: _imports_within_adapters(module) for module in _modules()}
    assert _cycle(graph) is None, f"an import loop in adapters/: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_loops() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.slow
def test_every_adapters_module_imports_on_its_own() -> None:
    """Each module in a fresh interpreter: none relies on another having been imported first.

    The package's `__init__` loads its names lazily, so importing one module runs that
    module's own imports only.
    """

    def import_alone(module: str) -> tuple[str, subprocess.CompletedProcess]:
        command = [sys.executable, "-c", f"import tokencompress.adapters.{module}"]
        return module, subprocess.run(command, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the interpreters start in parallel
        results = list(pool.map(import_alone, _modules()))
    failures = {module: result.stderr.strip().splitlines()[-1] for module, result in results if result.returncode}
    assert not failures, failures


def test_importing_one_module_does_not_import_the_others() -> None:
    code = ("import sys, tokencompress.adapters._wrap; "
            "print(sorted(m for m in sys.modules if m.startswith('tokencompress.adapters.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['tokencompress.adapters._wrap']"
