"""The one-token decoding forms of the sparse family against their full causal calls: token by token
from an empty state, and a prefix's state then steps, equal the rows of ``routing_attention`` (fixed
``cluster_window``) and ``topk_block_attention`` (odd lengths, GQA, every representative); padded rows
of a routing step keep their state and get zeros, whatever they hold; bad input raises."""

import pytest
import torch

import effattn.sparse as sparse
from effattn.sparse import (
    KMeansRouter,
    RoutingDecodeState,
    TopKBlockDecodeState,
    routing_attention,
    routing_decode_state,
    step_routing_attention,
    step_topk_block_attention,
    topk_block_attention,
    topk_block_decode_state,
)
from effattn.sparse import _common as common_mod
from effattn.sparse import kmeans as kmeans_mod
from effattn.sparse import routing as routing_mod
from tests.helpers import assert_fp32_close
from tests.sparse._blockwise_checks import run_doctests


def _qkv(B, T, H, Hkv, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, H, D, generator=g),
        torch.randn(B, T, Hkv, D, generator=g),
        torch.randn(B, T, Hkv, Dv, generator=g),
    )


def _steps(step, q, k, v, state, **kw):
    outs = []
    for t in range(q.shape[1]):
        o, state = step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state, **kw)
        outs.append(o)
    return torch.cat(outs, 1), state


# ----------------------------------------------------------------------------------------------- routing
ROUTING_HEADS = [(4, 4, 2), (4, 2, 2), (4, 2, 0), (4, 2, 4), (6, 3, 2)]  # (H_q, H_kv, local_heads)


@pytest.mark.parametrize("T", [1, 7, 23, 41])
@pytest.mark.parametrize("heads", ROUTING_HEADS, ids=lambda h: "Hq{}-Hkv{}-L{}".format(*h))
def test_routing_steps_equal_the_full_causal_call(heads, T):
    H, Hkv, L = heads
    q, k, v = _qkv(2, T, H, Hkv, seed=T)
    kw = dict(num_clusters=3, local_heads=L, window=5, cluster_window=3, seed=1)
    full = routing_attention(q, k, v, causal=True, **kw)
    o, state = _steps(step_routing_attention, q, k, v, None, **kw)
    assert_fp32_close(o, full, name="token by token from an empty state")
    assert state.pos.tolist() == [T, T] and int(state.rcount.sum()) == 2 * (H - L) * T
    assert state.lk.shape[1] <= 5 and state.rk.shape[3] <= 3  # rings stay within their bounds
    cut = T // 2
    pre = routing_decode_state(q[:, :cut], k[:, :cut], v[:, :cut], **kw)
    o2, _ = _steps(step_routing_attention, q[:, cut:], k[:, cut:], v[:, cut:], pre, **kw)
    assert_fp32_close(o2, full[:, cut:], name=f"prefix {cut} then steps")


def test_routing_steps_with_a_router_and_a_scale():
    q, k, v = _qkv(1, 29, 4, 2, seed=3)
    router = KMeansRouter(2, 8, 4, seed=0).eval()
    kw = dict(router=router, local_heads=2, window=4, cluster_window=5, scale=0.7)
    full = routing_attention(q, k, v, causal=True, **kw)
    before = router.centroids.clone()
    o, _ = _steps(step_routing_attention, q, k, v, None, **kw)
    assert_fp32_close(o, full)
    assert torch.equal(router.centroids, before)  # a step never moves the centroids


def test_routing_padded_rows_keep_their_state_and_get_zeros():
    q, k, v = _qkv(2, 12, 4, 2, seed=5)
    kw = dict(num_clusters=3, local_heads=2, window=4, cluster_window=3)
    state = routing_decode_state(q[:, :8], k[:, :8], v[:, :8], **kw)
    valid = torch.tensor([True, False])
    bad = [x[:, 8:9].clone() for x in (q, k, v)]
    for x in bad:
        x[1] = float("nan")  # the padded row's values must not matter
    o, new = step_routing_attention(*bad, state, valid=valid, **kw)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    for name in ("pos", "lk", "lv", "lmask", "rk", "rv", "rmask", "rcount"):
        old_t, new_t = state[name][1], new[name][1]
        n = old_t.shape[0] if old_t.dim() else None
        if name in ("lk", "lv", "lmask"):
            new_t = new_t[:n]
        if name in ("rk", "rv", "rmask"):
            new_t = new_t[:, :, : old_t.shape[2]]
        assert torch.isfinite(new_t.float()).all() and torch.equal(new_t, old_t), name
    o_ref, _ = step_routing_attention(
        *(x[:1, 8:9] for x in (q, k, v)), routing_decode_state(q[:1, :8], k[:1, :8], v[:1, :8], **kw), **kw
    )
    assert_fp32_close(o[:1], o_ref, name="the real row is unaffected by its padded neighbour")


def test_routing_state_bytes_and_fields():
    q, k, v = _qkv(1, 20, 4, 4)
    st = routing_decode_state(q, k, v, num_clusters=2, local_heads=2, window=4, cluster_window=3)
    tensors = [st[name] for name in ("pos", "lk", "lv", "lmask", "rk", "rv", "rmask", "rcount")]
    assert st.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    with pytest.raises(KeyError, match="no field"):
        st["centroids"]


def test_routing_step_bad_input():
    q, k, v = _qkv(2, 6, 4, 2)
    kw = dict(num_clusters=3, local_heads=2, window=4, cluster_window=3)
    _, st = step_routing_attention(q[:, :1], k[:, :1], v[:, :1], None, **kw)
    with pytest.raises(ValueError, match="one token"):
        step_routing_attention(q[:, :2], k[:, :2], v[:, :2], st, **kw)
    with pytest.raises(TypeError, match="RoutingDecodeState"):
        step_routing_attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], {"pos": st.pos}, **kw)
    with pytest.raises(ValueError, match="batch"):
        step_routing_attention(q[:1, 1:2], k[:1, 1:2], v[:1, 1:2], st, **kw)
    with pytest.raises(ValueError, match="state.rk"):
        step_routing_attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], st, **dict(kw, num_clusters=4))
    with pytest.raises(ValueError, match="state.lk"):
        step_routing_attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], st, **dict(kw, local_heads=0))
    with pytest.raises(ValueError, match="valid"):
        step_routing_attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], st, valid=torch.ones(3, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="cluster_window"):
        step_routing_attention(q[:, :1], k[:, :1], v[:, :1], None, **dict(kw, cluster_window=0))
    with pytest.raises(TypeError, match="cluster_window"):
        step_routing_attention(q[:, :1], k[:, :1], v[:, :1], None, num_clusters=3)  # no fixed window
    with pytest.raises(ValueError, match="valid"):
        routing_decode_state(q, k, v, valid=torch.ones(2, 5, dtype=torch.bool), **kw)


# ----------------------------------------------------------------------------------------------- top-k block
TOPK_CASES = [(1, 4, 1), (13, 4, 2), (37, 5, 3), (50, 8, 1)]  # (T, block, top_k)


@pytest.mark.parametrize("representative", ["mean", "max", "last"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (3, 1)], ids=lambda h: "Hq{}-Hkv{}".format(*h))
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "T{}-block{}-top{}".format(*c))
def test_topk_block_steps_equal_the_full_causal_call(case, heads, representative):
    T, block, top_k = case
    q, k, v = _qkv(2, T, *heads, seed=T)
    n_blocks = -(-T // block)
    top_k = min(top_k, n_blocks - 1) or top_k  # the full call takes at most the n - 1 candidates
    kw = dict(block=block, top_k=top_k, representative=representative)
    if n_blocks == 1:
        full = torch.nn.functional.scaled_dot_product_attention(
            *(
                x.transpose(1, 2).repeat_interleave(heads[0] // heads[1], 1) if i else x.transpose(1, 2)
                for i, x in enumerate((q, k, v))
            ),
            is_causal=True,
        ).transpose(1, 2)
    else:
        full = topk_block_attention(q, k, v, causal=True, **kw)
    o, state = _steps(step_topk_block_attention, q, k, v, None, **kw)
    assert_fp32_close(o, full, name="token by token from an empty state")
    assert state.k.shape[1] == T and state.reps.shape[1] == T // block
    cut = T // 2
    pre = topk_block_decode_state(q[:, :cut], k[:, :cut], v[:, :cut], block=block, representative=representative)
    o2, _ = _steps(step_topk_block_attention, q[:, cut:], k[:, cut:], v[:, cut:], pre, **kw)
    assert_fp32_close(o2, full[:, cut:], name=f"prefix {cut} then steps")


def test_topk_block_state_bytes():
    q, k, v = _qkv(1, 20, 2, 2)
    st = topk_block_decode_state(q, k, v, block=8)
    assert st.nbytes == sum(t.numel() * t.element_size() for t in (st.k, st.v, st.reps, st.q_recent, st.pooled))
    assert isinstance(st, TopKBlockDecodeState)


def test_topk_block_step_bad_input():
    q, k, v = _qkv(2, 10, 4, 2)
    st = topk_block_decode_state(q[:, :9], k[:, :9], v[:, :9], block=4)
    one = (q[:, 9:], k[:, 9:], v[:, 9:])
    with pytest.raises(ValueError, match="one token"):
        step_topk_block_attention(q[:, :2], k[:, :2], v[:, :2], st, block=4, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        step_topk_block_attention(*one, st, block=4, top_k=0)
    with pytest.raises(ValueError, match="block"):
        step_topk_block_attention(*one, st, block=0, top_k=1)
    with pytest.raises(ValueError, match="block size"):
        step_topk_block_attention(*one, st, block=3, top_k=1)  # a state made with block=4
    with pytest.raises(ValueError, match="representative"):
        step_topk_block_attention(*one, st, block=4, top_k=1, representative="median")
    with pytest.raises(TypeError, match="TopKBlockDecodeState"):
        step_topk_block_attention(*one, (st.k, st.v), block=4, top_k=1)
    with pytest.raises(ValueError, match="state holds keys"):
        step_topk_block_attention(q[:1, 9:], k[:1, 9:], v[:1, 9:], st, block=4, top_k=1)
    with pytest.raises(ValueError, match="heads"):
        step_topk_block_attention(q[:, 9:, :3], k[:, 9:], v[:, 9:], None, block=4, top_k=1)


# ----------------------------------------------------------------------------------------------- exports, docs
def test_step_forms_are_exported_and_their_examples_run():
    for name in (
        "RoutingDecodeState",
        "routing_decode_state",
        "step_routing_attention",
        "TopKBlockDecodeState",
        "topk_block_decode_state",
        "step_topk_block_attention",
    ):
        assert name in sparse.__all__ and hasattr(sparse, name)
    assert RoutingDecodeState is routing_mod.RoutingDecodeState
    run_doctests(routing_mod)
    run_doctests(kmeans_mod)
    run_doctests(common_mod)
