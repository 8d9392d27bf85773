"""effattn.linear.REGISTRY is the generic Registry and keeps its dict-like uses; the family's shared
helpers have one home each (no private name imported across modules, one chunking helper)."""

import ast
import pkgutil
from pathlib import Path

import pytest
import torch

import effattn.exact
import effattn.linear
from effattn._registry import Registry
from effattn.exact import alibi_slopes
from effattn.linear import REGISTRY, LinearOp, lightning_log_decay
from effattn.linear._common import check_chunk_size, from_chunks, register, to_chunks

MODULES = sorted(m.name for m in pkgutil.iter_modules(effattn.linear.__path__))


def test_registry_is_the_generic_registry_with_dict_like_uses():
    assert isinstance(REGISTRY, Registry) and REGISTRY.kind == "linear op"
    names = sorted(REGISTRY)
    assert names == REGISTRY.names() and len(names) == len(REGISTRY) >= 12
    as_dict = dict(REGISTRY)
    assert sorted(as_dict) == names
    for name, op in REGISTRY.items():
        assert isinstance(op, LinearOp) and op.name == name and name in REGISTRY
        assert REGISTRY[name] is op is as_dict[name]
    with pytest.raises(ValueError, match="unknown linear op 'nope'; registered: "):
        REGISTRY["nope"]


def test_every_module_that_defines_forms_registers_an_op():
    """Each method module (not the private helpers) registers at least one op whose forms it defines."""
    registered_modules = {op.naive.__module__ for op in REGISTRY.values()}
    methods = {f"effattn.linear.{m}" for m in MODULES if not m.startswith("_")}
    assert methods == registered_modules


def test_register_refuses_a_second_op_under_a_taken_name():
    op = REGISTRY["gla"]
    assert register(op) is op  # re-registering the same object (a module reload) is allowed
    clone = LinearOp("gla", op.naive, op.chunk, op.step, op.make_inputs, op.state_shape)
    with pytest.raises(ValueError, match="linear op 'gla' is already registered"):
        register(clone)


@pytest.mark.parametrize("T, C", [(1, 4), (7, 4), (8, 4), (97, 16), (5, 64)])
def test_to_chunks_round_trip_and_zero_padding(T, C):
    gen = torch.Generator().manual_seed(T * 100 + C)
    x = torch.randn(2, T, 3, 5, generator=gen)
    c = to_chunks(x, C)
    N = -(-T // C)
    assert c.shape == (2, 3, N, C, 5)
    assert torch.equal(from_chunks(c, T), x)
    assert torch.all(c.permute(0, 2, 3, 1, 4).reshape(2, N * C, 3, 5)[:, T:] == 0)
    g = torch.randn(2, T, 3, generator=gen)  # gates [B, T, H] too
    assert to_chunks(g, C).shape == (2, 3, N, C)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None, "8"])
def test_one_chunk_size_check_for_the_family(bad):
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        check_chunk_size(bad)
    for op in REGISTRY.values():
        args, kwargs = op.make_inputs(1, 5, 1, 4)
        with pytest.raises(ValueError, match="chunk_size"):
            op.chunk(*args, **kwargs, chunk_size=bad)


def test_lightning_decays_are_exacts_alibi_slopes():
    for H in (1, 3, 4, 6, 8, 12, 16, 40):
        assert torch.equal(lightning_log_decay(H), -alibi_slopes(H))
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        lightning_log_decay(0)


def _private_imports(path: Path) -> list[str]:
    """``from X import _name`` (or ``import X._y.z`` of a private name) where X is another module."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("effattn"):
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return bad


@pytest.mark.parametrize("package", [effattn.linear, effattn.exact], ids=["linear", "exact"])
def test_no_private_name_is_imported_across_modules(package):
    root = Path(package.__path__[0])
    found = {str(p.relative_to(root)): _private_imports(p) for p in sorted(root.rglob("*.py"))}
    assert {p: names for p, names in found.items() if names} == {}


def test_delta_helpers_docstring_example_runs():
    import doctest

    import effattn.linear._delta as delta

    result = doctest.testmod(delta)
    assert result.attempted > 0 and result.failed == 0
