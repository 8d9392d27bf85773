"""Row consistency: the last ``t`` query rows of a call equal the same rows of the full call.

Every mask and score mod that takes an ``offset`` places query ``i`` of a partial call at position
``i + offset`` with ``offset = T_k - T_q``; a decoding step is exactly such a partial call. For several
``t < T``, each rule, each backend that runs it and the decode path must give the full call's rows.
(This property caught the global-token rule testing the *local* query index.)
"""

from __future__ import annotations

import pytest
import torch

from effattn import attention, decode_attention
from effattn.exact import (
    alibi,
    alibi_slopes,
    causal_mask,
    dilated_mask,
    global_local_mask,
    global_tokens_mask,
    prefix_lm_mask,
    relative_position_bias,
    sliding_window_mask,
    streaming_mask,
)

T = 97
TAILS = (1, 5, 40, 96)
H, HKV, D = 4, 2, 24


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T, H, D, generator=g)
    k = torch.randn(2, T, HKV, D, generator=g)
    v = torch.randn(2, T, HKV, D, generator=g)
    return q, k, v


_TABLE = torch.randn(H, 2 * 6 + 1, generator=torch.Generator().manual_seed(3))

# name -> offset -> attention() keyword arguments
RULES = {
    "causal_mask": lambda off: {"mask_mod": causal_mask(off)},
    "window_mask": lambda off: {"mask_mod": sliding_window_mask(7, 0, off)},
    "window_mask_two_sided": lambda off: {"mask_mod": sliding_window_mask(5, 3, off)},
    "prefix_lm": lambda off: {"mask_mod": prefix_lm_mask(10, off)},
    "streaming": lambda off: {"mask_mod": streaming_mask(8, 3, off)},
    "dilated_causal": lambda off: {"mask_mod": dilated_mask(4, 3, off, causal=True)},
    "dilated_two_sided": lambda off: {"mask_mod": dilated_mask(4, 2, off, causal=False)},
    "global_local": lambda off: {"mask_mod": global_local_mask(4, 8, off)},
    "global_local_causal": lambda off: {"mask_mod": global_local_mask(4, 8, off, causal=True)},
    "global_tokens": lambda off: {"mask_mod": global_tokens_mask(4, off)},
    "alibi_mod": lambda off: {"causal": True, "score_mod": alibi(alibi_slopes(H), off)},
    "relative_bias": lambda off: {"score_mod": relative_position_bias(_TABLE, 6, off)},
    # the keyword forms: attention() derives the offset from T_k - T_q itself
    "kw_causal": lambda off: {"causal": True},
    "kw_window": lambda off: {"causal": True, "window": 9},
    "kw_window_two_sided": lambda off: {"window": (6, 4)},
    "kw_alibi": lambda off: {"causal": True, "alibi_slopes": alibi_slopes(H)},
    "kw_softcap_sinks": lambda off: {"causal": True, "softcap": 2.0, "sinks": torch.linspace(-1.0, 1.0, H)},
}


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_last_rows_equal_full_call(name, backend):
    q, k, v = _qkv()
    full = attention(q, k, v, backend="reference", **RULES[name](0))
    for t in TAILS:
        part = attention(q[:, T - t :], k, v, backend=backend, **RULES[name](T - t))
        torch.testing.assert_close(part, full[:, T - t :], atol=2e-6, rtol=1e-5, msg=f"{name}, last {t} rows")


def test_partial_global_rows_are_not_global():
    """The defect this file pins: a decoding query past the global tokens must not see every key."""
    q, k, v = _qkv(1)
    mask = global_local_mask(4, 8, T - 1)
    vis = mask(torch.zeros(1), torch.zeros(1), torch.arange(1).view(1, 1), torch.arange(T).view(1, T))
    # non-causal int window w: |i - j| < w, so position T-1 sees the 4 global keys and keys T-8 .. T-1
    expected = (torch.arange(T) < 4) | (torch.arange(T) >= T - 8)
    assert torch.equal(vis.flatten(), expected)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("extras", ["plain", "softcap_sinks"])
def test_decode_rows_equal_full_call(window, extras):
    """decode_attention over a cache of length T (with garbage past each sequence's end) gives the
    full causal call's last rows, for every tail length and a ragged batch."""
    q, k, v = _qkv(2)
    kw = {} if extras == "plain" else {"softcap": 3.0, "sinks": torch.linspace(-0.5, 0.5, H)}
    lens = (T, T - 20)
    k_cache = torch.cat([k, torch.randn(2, 7, HKV, D)], 1)  # 7 unused slots at the end
    v_cache = torch.cat([v, torch.randn(2, 7, HKV, D)], 1)
    for b, L in enumerate(lens):
        full = attention(q[b : b + 1, :L], k[b : b + 1, :L], v[b : b + 1, :L], causal=True, window=window, **kw)
        for t in TAILS:
            if t > L:
                continue
            q_new = q[:, L - t : L]  # row b: sequence b's last t queries (the other row is not checked)
            lens_call = torch.tensor([T, T]).index_fill_(0, torch.tensor(b), L)  # ragged when b = 1
            out = decode_attention(q_new, k_cache, v_cache, lens_call, window=window, num_splits=3, **kw)
            torch.testing.assert_close(out[b : b + 1], full[:, L - t :], atol=2e-6, rtol=1e-5)
