"""Triton split-KV decoding equals the full attention call, on contiguous and paged caches.

Kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` set before triton is imported,
as in ``test_triton.py``), compiled on CUDA where present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from effattn import attention  # noqa: E402
from effattn.exact.triton_kernels import triton_status  # noqa: E402
from tests.helpers import assert_fp32_close, assert_lowp_close  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from effattn.exact.masks import alibi_slopes  # noqa: E402
from effattn.exact.triton_kernels.decode import triton_decode_attention  # noqa: E402
from effattn.kv import PagedKVCache  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"] if triton_status(torch.device("cpu"))[0] else []
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not DEVICES, reason=f"triton cannot run here: {triton_status(torch.device('cpu'))[1]}"),
]


def _full(q, kc, vc, lens, dtype=torch.float64, **kw):
    """Per sequence: the full attention call over its cached keys (causal, bottom-right)."""
    outs, lses = [], []
    for b, L in enumerate(lens.tolist()):
        o, lse = attention(
            *(x[b : b + 1, :L].to(dtype) if i else x[b : b + 1].to(dtype) for i, x in enumerate((q, kc, vc))),
            causal=True,
            return_lse=True,
            backend="reference",
            **kw,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _cache(B, Tmax, Hkv, D, Dv, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Tmax, Hkv, D, generator=g).to(device), torch.randn(B, Tmax, Hkv, Dv, generator=g).to(device)


OPTIONS = {
    "plain": {},
    "window": {"window": 9},
    "softcap_sinks": {"softcap": 4.0, "sinks": "sinks"},
    "alibi": {"alibi_slopes": "alibi"},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_contiguous_cache_equals_full_call(option, new_tokens, device):
    B, Tmax, Hq, Hkv, D, Dv = 3, 150, 6, 2, 24, 20
    kc, vc = _cache(B, Tmax, Hkv, D, Dv, device)
    q = torch.randn(B, new_tokens, Hq, D, generator=torch.Generator().manual_seed(1)).to(device)
    lens = torch.tensor([150, 61, new_tokens], device=device)
    kw = dict(OPTIONS[option])
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.linspace(-1, 2, Hq, device=device)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = alibi_slopes(Hq).to(device)
    o, lse = triton_decode_attention(q, kc, vc, lens, num_splits=3, return_lse=True, **kw)
    ro, rlse = _full(q, kc, vc, lens, **kw)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(lse, rlse, 1e-5, "lse")


@pytest.mark.parametrize("device", DEVICES)
def test_contiguous_bf16_flash_attention_rule(device):
    kc, vc = _cache(2, 90, 1, 32, 32, device)
    q = torch.randn(2, 2, 4, 32, generator=torch.Generator().manual_seed(1)).to(device)
    lens = torch.tensor([90, 40], device=device)
    o = triton_decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), lens, num_splits=2)
    low = _full(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), lens, dtype=torch.bfloat16)[0]
    ref = _full(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), lens)[0]
    assert o.dtype == torch.bfloat16
    assert_lowp_close(o, low, ref)


def _paged(kc, vc, lens, block_size, device):
    """A paged cache holding the same sequences (the second forked from the first, then diverging)."""
    B, _, Hkv, D = kc.shape
    cache = PagedKVCache(num_blocks=40, block_size=block_size, kv_heads=Hkv, head_dim=D, head_dim_v=vc.shape[-1])
    cache.key_blocks.fill_(float("nan"))  # garbage in every slot no sequence has written
    cache.value_blocks.fill_(float("inf"))
    ids = [cache.allocate()]
    cache.append(ids[0], kc[0, :20], vc[0, :20])
    for b in range(1, B):
        ids.append(cache.fork(ids[0]) if b == 1 else cache.allocate())
    kc, vc = kc.clone(), vc.clone()
    kc[1, :20], vc[1, :20] = kc[0, :20], vc[0, :20]  # the fork shares sequence 0's first 20 tokens
    cache.append(ids[0], kc[0, 20 : lens[0]], vc[0, 20 : lens[0]])
    cache.append(ids[1], kc[1, 20 : lens[1]], vc[1, 20 : lens[1]])
    for b in range(2, B):
        cache.append(ids[b], kc[b, : lens[b]], vc[b, : lens[b]])
    tables, seq_lens = cache.block_tables(ids)
    assert seq_lens.tolist() == lens.tolist()
    return cache.key_blocks.to(device), cache.value_blocks.to(device), tables.to(device), kc, vc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_cache_equals_full_call(block_size, device):
    B, Tmax, Hq, Hkv, D, Dv = 3, 100, 4, 2, 16, 16
    kc, vc = _cache(B, Tmax, Hkv, D, Dv, "cpu")
    lens = torch.tensor([100, 47, 9])
    kp, vp, tables, kc, vc = _paged(kc, vc, lens, block_size, device)
    q = torch.randn(B, 2, Hq, D, generator=torch.Generator().manual_seed(1)).to(device)
    sinks = torch.linspace(-1, 1, Hq, device=device)
    o = triton_decode_attention(q, kp, vp, lens.to(device), block_table=tables, window=30, sinks=sinks, num_splits=2)
    ro, _ = _full(q, kc.to(device), vc.to(device), lens, window=30, sinks=sinks)
    assert_fp32_close(o, ro, 1e-5, "o")


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_cache_entry_poisons_only_rows_that_see_it(device):
    kc, vc = _cache(2, 80, 1, 16, 16, device)
    q = torch.randn(2, 3, 2, 16, generator=torch.Generator().manual_seed(1)).to(device)
    lens = torch.tensor([80, 50], device=device)
    clean = triton_decode_attention(q, kc, vc, lens, window=10, num_splits=2)
    kc[0, 69, 0, 2] = float("nan")  # seen by the queries at 77 and 78 (windows 68..77, 69..78), not 79
    kc[0, 68, 0, 0] = float("inf")  # seen by the query at 77 only
    vc[1, 48, 0, 1] = float("nan")  # sequence 1: seen by its queries at 48 and 49, not 47
    vc[1, 60:, 0] = float("nan")  # past its length: never read
    o = triton_decode_attention(q, kc, vc, lens, window=10, num_splits=2)
    # sequence 0: windows of 10 keys ending at 77, 78, 79 start at 68, 69, 70
    assert torch.isnan(o[0, 0]).all() and torch.isnan(o[0, 1]).all()
    assert torch.equal(o[0, 2], clean[0, 2])
    assert torch.equal(o[1, 0], clean[1, 0]) and torch.isnan(o[1, 1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_backend_triton_equals_torch(device):
    from effattn.exact import decode_attention

    kc, vc = _cache(2, 70, 2, 16, 16, device)
    q = torch.randn(2, 2, 4, 16, generator=torch.Generator().manual_seed(1)).to(device)
    lens = torch.tensor([70, 30], device=device)
    sinks = torch.linspace(-1, 1, 4, device=device)
    kw = {"window": 12, "softcap": 3.0, "sinks": sinks, "num_splits": 3, "return_lse": True}
    o, lse = decode_attention(q, kc, vc, lens, backend="triton", **kw)
    ro, rlse = decode_attention(q, kc, vc, lens, **kw)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(lse, rlse, 1e-5, "lse")
    with pytest.raises(ValueError, match="backend must be 'torch', 'lean' or 'triton'"):
        decode_attention(q, kc, vc, lens, backend="cuda")
