from __future__ import annotations

import pytest
import torch

import tokencompress
from tokencompress import TokenCompressor, create_compressor, list_compressors, register_compressor
from tokencompress.base import check_tokens, resolve_grid
from tokencompress.registry import _REGISTRY


class _Identity(TokenCompressor):
    def out_grid(self, grid):
        return grid

    def out_dim(self, dim):
        return dim

    @classmethod
    def for_dim(cls, dim):
        return cls()

    def get_config(self):
        return {}

    def compress(self, x, grid):
        return x


class _Broken(_Identity):
    """Returns one token fewer than its contract says."""

    def compress(self, x, grid):
        return x[:, 1:]


@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_public_names_are_exported() -> None:
    for name in ["SAP", "AvgPool", "PixelShuffle", "LDP", "LDPv2", "EmbQ", "Compose",
                 "TokenCompressor", "create_compressor", "list_compressors", "register_compressor"]:
        assert hasattr(tokencompress, name), name
        assert name in tokencompress.__all__


def test_register_create_and_list(scratch_registry) -> None:
    register_compressor("identity_test")(_Identity)
    assert "identity_test" in list_compressors()
    assert list_compressors() == sorted(list_compressors())
    compressor = create_compressor("identity_test")
    assert isinstance(compressor, _Identity)
    x = torch.randn(2, 9, 4)
    assert torch.equal(compressor(x), x)


def test_duplicate_name_is_an_error(scratch_registry) -> None:
    register_compressor("identity_test")(_Identity)
    with pytest.raises(ValueError, match="'identity_test' is already registered"):
        register_compressor("identity_test")(_Identity)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown compressor name='nope'; expected one of \["):
        create_compressor("nope")


def test_only_compressors_register(scratch_registry) -> None:
    with pytest.raises(TypeError, match="needs a TokenCompressor subclass"):
        register_compressor("module_test")(torch.nn.Linear)


def test_incomplete_subclass_cannot_be_built() -> None:
    class NoMaths(TokenCompressor):
        def out_grid(self, grid):
            return grid

    with pytest.raises(TypeError, match="abstract"):
        NoMaths()


def test_forward_catches_a_compressor_that_breaks_its_contract() -> None:
    with pytest.raises(RuntimeError, match=r"returned shape \(1, 8, 4\) but its contract says \(1, 9, 4\)"):
        _Broken()(torch.randn(1, 9, 4))


@pytest.mark.parametrize("grid, tokens, message", [
    (None, 10, "N=10 tokens, which is not a perfect square"),
    ((3, 4), 10, r"grid=\(3, 4\) holds 12 tokens but x has N=10"),
    ((3,), 3, "pair of positive ints"),
    ((2.0, 5), 10, "pair of positive ints"),
    ((True, 10), 10, "pair of positive ints"),
])
def test_resolve_grid_errors(grid, tokens, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_grid(tokens, grid)


def test_resolve_grid_values() -> None:
    assert resolve_grid(729, None) == (27, 27)
    assert resolve_grid(10, [2, 5]) == (2, 5)
    assert resolve_grid(10, torch.tensor([5, 2])) == (5, 2)


def test_check_tokens_errors() -> None:
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_tokens([[1.0]])
    with pytest.raises(ValueError, match="floating-point"):
        check_tokens(torch.ones(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        check_tokens(torch.ones(1, 0, 2))
    with pytest.raises(ValueError, match="width C=2, expected C=3"):
        check_tokens(torch.ones(1, 4, 2), dim=3)
