"""The one per-layer cache protocol (effattn.kv.LayerCache): every cache behind nn.Attention gives the
same outputs as the contiguous cache, reorder/crop where supported (decode after them equals running
the reordered / shorter sequences afresh), clear errors where not, and kv never imports nn."""

from __future__ import annotations

import ast
import doctest
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effattn.kv.base
import effattn.kv.compressed
import effattn.kv.paged
import effattn.nn.attention
from effattn.kv import (
    AttentionPattern,
    CachedKV,
    CompressedKVCache,
    KVCache,
    LayerCache,
    PagedKVCache,
    PagedLayerCache,
    QuantizedKVCache,
    WindowKVCache,
    make_policy,
)
from effattn.nn import LM, Attention, LMConfig
from tests.helpers import assert_fp32_close

DIM, HEADS, KV_HEADS, HD = 32, 4, 2, 8
KV_SRC = Path(effattn.kv.base.__file__).parent


def _layer(seed: int = 0, **kw) -> Attention:
    torch.manual_seed(seed)
    return Attention(DIM, HEADS, kv_heads=KV_HEADS, **kw)


def _x(B: int = 2, T: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed))


def _paged(B: int = 2, blocks: int = 64, block_size: int = 4) -> PagedLayerCache:
    pool = PagedKVCache(blocks, block_size, KV_HEADS, HD)
    return pool.layer([pool.allocate() for _ in range(B)])


def _policy_cache():
    return CompressedKVCache(make_policy("h2o", budget=1000), num_layers=1).layer(0)


# every cache of the protocol, fresh (a factory per name)
FACTORIES = {
    "contiguous": KVCache,
    "window": functools.partial(WindowKVCache, 8, slack=4),  # for a layer with window=9 (keep 8)
    "quantized8": functools.partial(QuantizedKVCache, bits=8, group_size=4, residual=64),
    "paged": _paged,
    "policy": _policy_cache,
}


def _layer_for(name: str) -> Attention:
    return _layer(window=9) if name == "window" else _layer()


def _decode(layer, x, cache, split: int):
    """Prefill ``x[:, :split]`` then one token at a time; outputs concatenated."""
    ys = []
    with torch.no_grad():
        y, cache = layer(x[:, :split], cache)
        ys.append(y)
        for t in range(split, x.shape[1]):
            y, cache = layer(x[:, t : t + 1], cache)
            ys.append(y)
    return torch.cat(ys, 1), cache


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_cache_is_a_layer_cache_and_decodes_like_the_full_forward(name):
    layer, x = _layer_for(name), _x()
    cache = FACTORIES[name]()
    assert isinstance(cache, LayerCache)
    full = layer(x)[0]
    out, cache = _decode(layer, x, cache, split=6)
    assert_fp32_close(out, full, name=name)  # 13 tokens stay in KIVI's 64-token residual: exact
    held = 13 if name != "window" else 9  # trimmed to keep = 8 at 12 = keep + slack tokens, then one more
    assert cache.lengths().tolist() == [[held, held]] * 2 and cache.batch_size == 2
    assert cache.nbytes > 0


@pytest.mark.parametrize("name", ["contiguous", "quantized8", "paged"])
def test_left_padded_rows_through_the_protocol(name):
    """A left-padded batch: each real row's outputs equal the row run alone (padding never counts)."""
    layer, x = _layer(), _x(T=12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False
    with torch.no_grad():
        y, cache = layer(x[:, :9], FACTORIES[name](), valid=valid[:, :9])
        y2, cache = layer(x[:, 9:], cache)
        alone = layer(x[:1, 5:])[0]
        row1 = layer(x[1:])[0]
    assert_fp32_close(torch.cat([y, y2], 1)[0, 5:], alone[0], name=f"{name} padded row")
    assert_fp32_close(torch.cat([y, y2], 1)[1], row1[0], name=f"{name} full row")
    assert cache.lengths()[:, 0].tolist() == [7, 12]
    assert cache.next_positions(2, 1).tolist() == [[7], [12]]


@pytest.mark.parametrize("name", ["contiguous", "window", "quantized8", "paged", "policy"])
def test_reorder_then_decode_equals_the_reordered_rows(name):
    """Beam search: after reorder([1, 1]) (a row chosen twice, one dropped) decoding continues as if
    row 1 had been run twice from the start."""
    layer, x = _layer_for(name), _x(T=10)
    with torch.no_grad():
        _, cache = layer(x[:, :7], FACTORIES[name]())
        cache.reorder(torch.tensor([1, 1]))
        y, cache = layer(x[[1, 1], 7:], cache)
        ref = layer(x[[1, 1]])[0][:, 7:]
    assert_fp32_close(y, ref, name=name)
    assert cache.batch_size == 2


@pytest.mark.parametrize("name", ["contiguous", "window", "quantized8", "paged"])
def test_crop_then_decode_equals_the_shorter_sequence(name):
    layer, x = _layer_for(name), _x(T=12)
    with torch.no_grad():
        _, cache = layer(x[:, :10], FACTORIES[name]())
        cache.crop(6)  # drop the 4 newest tokens
        assert cache.lengths().tolist() == [[6, 6]] * 2
        y, cache = layer(x[:, 6:9], cache)
        ref = layer(x[:, :9])[0][:, 6:]
    assert_fp32_close(y, ref, name=name)


def test_paged_rows_share_blocks_after_reorder_and_release_them_on_crop():
    cache = _paged(B=2, blocks=8, block_size=4)
    pool = cache.cache
    k = torch.randn(2, 9, KV_HEADS, HD, generator=torch.Generator().manual_seed(0))
    cache.update(k, k.clone())
    assert pool.num_used_blocks == 6
    cache.reorder(torch.tensor([0, 0]))  # row 1 freed, row 0 forked: 3 blocks shared
    assert pool.num_used_blocks == 3 and cache.nbytes == 3 * pool.bytes_per_block
    kv = cache.update(k[:, :1], k[:, :1])  # copy-on-write of the shared, partly filled last block
    assert pool.num_used_blocks == 4 and torch.equal(kv.k[0, :9], kv.k[1, :9])
    assert torch.equal(kv.k[:, 9], k[:, 0]) and torch.equal(kv.k[0, :9], k[0])  # each row its own new token
    cache.crop(4)
    assert cache.lengths()[:, 0].tolist() == [4, 4] and pool.num_used_blocks == 1
    cache.reset()
    assert pool.num_used_blocks == 0 and cache.lengths()[:, 0].tolist() == [0, 0]


def test_caches_that_cannot_say_why():
    layer, x = _layer(), _x(T=10)
    with torch.no_grad():
        _, policy = layer(x, _policy_cache())
        _, dense = layer(x)
    with pytest.raises(TypeError, match="cannot be cropped: the policy evicted"):
        policy.crop(5)
    q = QuantizedKVCache(bits=4, group_size=4, residual=0)
    q.append(torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4))
    with pytest.raises(ValueError, match="quantized in groups of 4"):
        q.crop(6)
    w = WindowKVCache(3, slack=1)
    with torch.no_grad():
        _, w = _layer(window=4)(x, w)
    assert w.dropped > 0
    with pytest.raises(ValueError, match="dropped the first"):
        w.crop(w.dropped + 1)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 2\)"):
        dense.reorder(torch.tensor([5]))
    with pytest.raises(ValueError, match="length must be an int"):
        dense.crop(-1)


def test_patterns_and_their_errors():
    """check_pattern: what each cache accepts, named in the message."""
    assert AttentionPattern(window=8).keep == 7 and AttentionPattern(window=8, mods=True).keep is None
    assert CompressedKVCache.accepts(AttentionPattern()) and not CompressedKVCache.accepts(AttentionPattern(window=4))
    with pytest.raises(ValueError, match="needs a causal attention layer without window"):
        _policy_cache().check_pattern(AttentionPattern(window=4))
    with pytest.raises(TypeError, match="caches keys only"):
        QuantizedKVCache().check_pattern(AttentionPattern(key_only=True))
    with pytest.raises(ValueError, match="WindowKVCache keeping 3 tokens; this layer needs keep >= 7"):
        WindowKVCache(3).check_pattern(AttentionPattern(window=8))
    KVCache().check_pattern(AttentionPattern(key_only=True))  # a fresh contiguous cache takes either
    with pytest.raises(ValueError, match="left padding is not supported with a KV policy"):
        _policy_cache().next_positions(1, 2, torch.tensor([[False, True]]))
    with pytest.raises(TypeError, match="needs v and the new queries q"):
        _policy_cache().update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    with pytest.raises(TypeError, match="v is required"):
        _paged().update(torch.randn(2, 1, KV_HEADS, HD))
    with pytest.raises(ValueError, match="each once"):
        PagedKVCache(4, 4, 1, 4).layer([])


def test_policy_layer_cache_keeps_the_older_next_positions_form():
    c = _policy_cache()
    c.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), q=torch.randn(1, 3, 2, 4))
    assert c.next_positions(2, "cpu").tolist() == [3, 4] == c.next_positions(1, 2).tolist()
    kv = c.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4))
    assert isinstance(kv, CachedKV) and kv.k.shape == (1, 4, 1, 4) and kv.head_mask is None


def test_attend_has_no_cache_type_test_and_lm_finds_cache_layers_by_the_protocol():
    src = Path(effattn.nn.attention.__file__).read_text()
    attend = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "attend")
    names = {n.id for n in ast.walk(attend) if isinstance(n, ast.Name)}
    assert "isinstance" not in names and "type" not in names
    model = LM(LMConfig(vocab_size=40, dim=32, n_layers=5, heads=4, mixers="attention,mamba2,moh,mla,sliding_window"))
    assert model.cache_layers() == [0, 2, 3, 4]
    assert model.policy_layers() == [0, 2]  # plain causal over keys and values (MoH included)
    state = model.cache_state(functools.partial(QuantizedKVCache, bits=8))
    assert [type(s).__name__ if s is not None else None for s in state] == [
        "QuantizedKVCache", None, "QuantizedKVCache", None, "QuantizedKVCache",  # MLA: keys only
    ]  # fmt: skip
    assert isinstance(model.cache_state()[3], KVCache)  # a contiguous cache holds MLA's latent rows


def test_generate_with_a_policy_over_moh_layers_equals_the_full_cache():
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=40, dim=32, n_layers=2, heads=4, mixers="moh,attention")).eval()
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    full = model.generate(ids, 5, temperature=0.0)
    big = model.generate(ids, 5, temperature=0.0, kv_policy=make_policy("h2o", budget=1000))
    assert torch.equal(full, big)


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, lazy ones included
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    return mods


def test_kv_never_imports_nn():
    for path in sorted(KV_SRC.glob("*.py")):
        bad = {m for m in _imports(path) if m == "effattn.nn" or m.startswith("effattn.nn.")}
        assert not bad, f"{path.name} imports {bad}"
    code = "import sys, effattn.kv; sys.exit(any(m.startswith('effattn.nn') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize("mod", [effattn.kv.base, effattn.kv.compressed, effattn.kv.paged])
def test_docstring_examples_run(mod):
    res = doctest.testmod(mod, extraglobs={"torch": torch})
    assert res.failed == 0 and res.attempted > 0
