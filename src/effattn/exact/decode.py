"""Split-KV decode attention and the merge of partial attention states.

Flash-Decoding (Dao et al. 2023, "Flash-Decoding for long-context inference") splits a long KV cache
into chunks, attends to each independently and combines the partial results with their
log-sum-exps. This module's PyTorch form computes every split in one einsum (the scores of the whole
context at once: simple, not memory-bounded); ``backend="lean"`` runs Lean Attention's stream-K
schedule instead (:mod:`effattn.exact.lean`: equal work per worker, a bounded tile at a time). The
combination is associative:

    lse = log sum_s exp(lse_s) ;  o = sum_s exp(lse_s - lse) o_s

so ring attention and KV offloading reuse :func:`merge_attention_states` as well.
"""

from __future__ import annotations

import torch

from effattn._checks import check_cache_seqlens, check_positive_int, check_qkv, check_scale, check_tensor
from effattn.exact.lean import lean_decode_attention
from effattn.exact.masks import window_bounds
from effattn.exact.nonfinite import nonfinite_keys, poison_rows, zero_keys
from effattn.exact.reference import compute_dtype
from effattn.exact.triton_kernels.decode import triton_decode_attention


def merge_attention_states(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attention results over disjoint key sets.

    Args:
        outs: ``[S, B, T, H, D_v]`` (or a sequence of S tensors ``[B, T, H, D_v]``), each normalized
            over its own keys.
        lses: ``[S, B, H, T]`` (or a sequence) log-sum-exps of the parts; ``-inf`` marks an empty part.
    Returns ``(o [B, T, H, D_v], lse [B, H, T])``; rows empty in every part give ``o = 0, lse = -inf``;
    a row whose lse is NaN in some part (it saw a non-finite key) is NaN, with no gradient. Computed in
    ``compute_dtype(outs.dtype)`` (float32, or float64 for float64 ``outs``), the dtype of the returned lse.

    Example::

        >>> o, lse = merge_attention_states(torch.zeros(2, 1, 3, 2, 4), torch.zeros(2, 1, 2, 3))
        >>> lse[0, 0, 0].item() == torch.tensor(2.0).log().item()
        True
    """
    if not isinstance(outs, torch.Tensor):
        outs, lses = torch.stack(list(outs)), torch.stack(list(lses))
    check_tensor("outs", outs, 5, "[parts, batch, seq, heads, head_dim_v]")
    check_tensor("lses", lses, 4, "[parts, batch, heads, seq]")
    S, B, T, H, _ = outs.shape
    if tuple(lses.shape) != (S, B, H, T):
        raise ValueError(f"lses must have shape [parts, batch, heads, seq] = {(S, B, H, T)}, got {tuple(lses.shape)}")
    lses = lses.to(compute_dtype(outs.dtype))
    # a part whose row saw a non-finite key is NaN there (effattn.exact.nonfinite): the merged row is NaN
    # too, and constant, so no NaN weight multiplies a zero gradient on the way back
    poisoned = torch.isnan(lses).any(0)  # [B, H, T]
    if bool(poisoned.any()):
        lses = lses.masked_fill(poisoned, float("-inf"))
        outs = outs.masked_fill(poisoned.transpose(1, 2)[None, ..., None], 0.0)
    empty = (lses == float("-inf")).all(0)  # rows empty in every part: logsumexp's gradient would be NaN
    lse = torch.logsumexp(lses.masked_fill(empty, 0.0), dim=0).masked_fill(empty, float("-inf"))  # [B, H, T]
    lse_safe = lse.masked_fill(empty, 0.0)
    w = torch.exp(lses - lse_safe)  # [S, B, H, T]; empty parts weigh 0
    o = (outs.to(lses.dtype) * w.permute(0, 1, 3, 2)[..., None]).sum(0)
    o, lse = poison_rows(o, lse, poisoned.transpose(1, 2))
    return o.to(outs.dtype), lse


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    backend: str = "torch",
):
    """Attention of a few new queries against a long KV cache, split into chunks and merged.

    Args:
        q: ``[B, T_new, H_q, D]``: the newest ``T_new`` tokens, whose keys are already in the cache
            (as after appending), at positions ``cache_seqlens - T_new ... cache_seqlens - 1``.
        k_cache, v_cache: ``[B, T_max, H_kv, D]`` / ``[B, T_max, H_kv, D_v]``.
        cache_seqlens: ``[B]`` int, valid length of each sequence's cache (default ``T_max``).
        window: only the last ``window`` keys up to each query's position (sliding-window decode).
        softcap, sinks: as in :func:`effattn.attention`.
        num_splits: number of KV chunks (default: about one per 1024 cached tokens).
        backend: ``"torch"`` (this function's PyTorch form), ``"lean"`` (the stream-K schedule of
            :func:`effattn.exact.lean.lean_decode_attention`; ``num_splits`` is then its worker count)
            or ``"triton"`` (the split-KV kernel of
            :func:`effattn.exact.triton_kernels.decode.triton_decode_attention`; CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
    Queries attend causally: query ``t`` sees keys ``j <= cache_seqlens - T_new + t``.

    Example::

        >>> kc = torch.randn(2, 300, 2, 16); q = torch.randn(2, 1, 4, 16)
        >>> decode_attention(q, kc, kc, torch.tensor([300, 120]), num_splits=3).shape
        torch.Size([2, 1, 4, 16])
    """
    if backend == "triton":
        return triton_decode_attention(
            q, k_cache, v_cache, cache_seqlens, scale=scale, window=window, softcap=softcap, sinks=sinks,
            num_splits=num_splits, return_lse=return_lse,
        )  # fmt: skip
    if backend == "lean":
        return lean_decode_attention(
            q, k_cache, v_cache, cache_seqlens, scale=scale, window=window, softcap=softcap, sinks=sinks,
            num_workers=num_splits, return_lse=return_lse,
        )  # fmt: skip
    if backend != "torch":
        raise ValueError(f"backend must be 'torch', 'lean' or 'triton', got {backend!r}")
    B, Tn, Tmax, Hq, Hkv, D, Dv = check_qkv(q, k_cache, v_cache)
    scale = check_scale(scale, D)
    dev = q.device
    cache_seqlens = check_cache_seqlens(cache_seqlens, B, Tn, Tmax, dev)
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (Hq,)):
        raise ValueError(f"sinks must be a tensor of shape [heads_q] = [{Hq}]")
    left = window_bounds(window, True)[0] if window is not None else None
    L = int(cache_seqlens.max())
    if num_splits is None:
        num_splits = max(1, -(-L // 1024))
    check_positive_int("num_splits", num_splits)
    chunk = -(-L // num_splits)
    S = -(-L // chunk)
    pad = S * chunk - L
    G = Hq // Hkv
    k_used, v_used = k_cache[:, :L], v_cache[:, :L]
    bad = nonfinite_keys(k_used, v_used)  # garbage in unused slots is normal: see effattn.exact.nonfinite
    if bad is not None:
        k_used, v_used = zero_keys(k_used, v_used, bad)
    cd = compute_dtype(q.dtype)  # float32, or float64 for float64 input
    kc = torch.nn.functional.pad(k_used.to(cd), (0, 0, 0, 0, 0, pad)).view(B, S, chunk, Hkv, D)
    vc = torch.nn.functional.pad(v_used.to(cd), (0, 0, 0, 0, 0, pad)).view(B, S, chunk, Hkv, Dv)
    qf = q.to(cd).view(B, Tn, Hkv, G, D)
    s = torch.einsum("bthgd,bschd->bshgtc", qf, kc) * scale  # [B, S, Hkv, G, Tn, chunk]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(S * chunk, device=dev).view(1, S, 1, 1, 1, chunk)
    qpos = (cache_seqlens.view(B, 1) - Tn + torch.arange(Tn, device=dev)).view(B, 1, 1, 1, Tn, 1)
    ok = kpos <= qpos
    if left is not None:
        ok = ok & (qpos - kpos <= left)
    s = s.masked_fill(~ok, float("-inf"))
    lse_s = torch.logsumexp(s, dim=-1)  # [B, S, Hkv, G, Tn]
    p = torch.exp(s - lse_s.masked_fill(lse_s == float("-inf"), 0.0)[..., None])
    o_s = torch.einsum("bshgtc,bschd->bsthgd", p, vc).reshape(B, S, Tn, Hq, Dv)
    outs = o_s.permute(1, 0, 2, 3, 4)
    lses = lse_s.reshape(B, S, Hq, Tn).permute(1, 0, 2, 3)
    if sinks is not None:  # the sink is one more part: an empty value with logit sink_h
        outs = torch.cat([outs, torch.zeros_like(outs[:1])])
        lses = torch.cat([lses, sinks.to(cd).view(1, 1, Hq, 1).expand(1, B, Hq, Tn)])
    o, lse = merge_attention_states(outs, lses)
    if bad is not None:  # rows whose window holds a non-finite key or value
        bad_c = torch.nn.functional.pad(bad, (0, 0, 0, pad)).view(B, S, chunk, Hkv).permute(0, 1, 3, 2)
        sees = (ok & bad_c[:, :, :, None, None, :]).any(-1).any(1)  # [B, Hkv, 1, Tn]
        o, lse = poison_rows(o, lse, sees.expand(B, Hkv, G, Tn).reshape(B, Hq, Tn).transpose(1, 2))
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o
