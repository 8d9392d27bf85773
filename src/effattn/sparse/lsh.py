"""Reformer LSH attention (Kitaev, Kaiser and Levskaya 2020, "Reformer: The Efficient Transformer").

Angular LSH: per hash round ``r`` and head, a random matrix ``R_r [D, n_buckets / 2]`` (seeded, so a
call is deterministic given ``seed``) buckets a vector by ``h(x) = argmax([x R_r ; -x R_r])``; similar
directions land in the same bucket. Queries and keys are sorted by ``(bucket, position)`` and each
query attends, with exact softmax on the tiled engine, to a bounded set of keys around it in the
sorted order:

- non-causal (the paper): the sorted order is cut into chunks of ``chunk_size``; a query attends
  to its chunk and the previous one (cyclically, as the paper's implementation does);
- causal: to the ``2 * chunk_size`` most recent keys *of its own bucket* at positions ``<= t``.
  The paper's causal variant masks later positions inside the chunks, but the chunk boundaries
  themselves move when a later token hashes to a lower bucket, so the keys ``t`` sees would depend
  on the future; the per-bucket window depends on positions ``<= t`` only (same budget per query).

``shared_qk=True`` is the Reformer's shared-QK attention: the keys are the normalized queries
``k_j = q_j / |q_j|`` (pass ``k=None``), and a token does not attend to itself unless it has no other
key (the paper masks the self pair with a large negative score; here the pair is masked when any
other key is visible, which gives the same output). ``shared_qk=False`` hashes q and k separately
with the same ``R`` and sorts each (query chunk ``c`` attends key chunks ``c, c - 1``).

Several rounds: each round's output and log-sum-exp are combined with
:func:`effattn.merge_attention_states`, ``o = sum_r exp(lse_r - lse) o_r``. With ``dedup=True`` (the
paper's correction for keys met in several rounds, default) a pair already visible in an earlier
round is masked in later ones, so the result is exactly the softmax over the *union* of the rounds'
key sets (the paper subtracts ``log N_ij`` from each copy's score; the sum is the same). With
``dedup=False`` a key met in ``N`` rounds weighs ``N`` times (score + ``log N``).

Cost per round: ``O(T log T)`` to sort, ``O(T * 2 * chunk_size * D)`` attention; memory ``O(T)``.
"""

from __future__ import annotations

import torch

from effattn._checks import check_int, check_positive_int, check_scale, check_tensor
from effattn.sparse._buckets import (
    Round,
    chunk_round,
    expand_kv,
    merge_states,
    round_mask,
    sorted_attention,
    window_round,
)
from effattn.sparse._common import SparseMethod, check_block_size, register


def _check_inputs(q, k, v, shared_qk: bool) -> tuple[int, int, int]:
    """``(T, group_k, group_v)``: the sequence length and how many query heads share a k / v head."""
    check_tensor("q", q, 4, "[batch, seq, heads_q, head_dim]")
    check_tensor("v", v, 4, "[batch, seq, heads_kv, head_dim_v]")
    if not isinstance(shared_qk, bool):
        raise TypeError(f"shared_qk must be a bool, got {shared_qk!r}")
    B, T, Hq, D = q.shape
    if shared_qk:
        if k is not None:
            raise ValueError("shared_qk=True derives the keys from q (k = q / |q|): pass k=None")
    else:
        if k is None:
            raise ValueError("k is None: pass the keys, or shared_qk=True to use the normalized queries")
        check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
        if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or Hq % k.shape[2]:
            raise ValueError(
                f"k must be [batch, seq, heads_kv, head_dim] = [{B}, {T}, heads dividing {Hq}, {D}] "
                f"(LSH attention is self-attention: seq_k == seq_q), got {tuple(k.shape)}"
            )
        if k.dtype != q.dtype:
            raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}")
    if v.shape[0] != B or v.shape[1] != T or Hq % v.shape[2]:
        raise ValueError(
            f"v must be [batch, seq, heads_kv, head_dim_v] = [{B}, {T}, heads dividing {Hq}, *], got {tuple(v.shape)}"
        )
    if v.dtype != q.dtype:
        raise TypeError(f"v has dtype {v.dtype} but q has {q.dtype}")
    if not shared_qk and k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads_kv: k {tuple(k.shape)}, v {tuple(v.shape)}")
    return T, (1 if shared_qk else Hq // k.shape[2]), Hq // v.shape[2]


def default_n_buckets(T: int, chunk_size: int, causal: bool) -> int:
    """``T / chunk_size`` buckets (the paper's choice: a bucket about fills a chunk); causal ``T / (4 chunk_size)``,
    so that a bucket holds about twice the ``2 * chunk_size`` keys a query may see (its past in the bucket
    is otherwise shorter than the window). Even, at least 2."""
    n = T // (4 * chunk_size) if causal else T // chunk_size
    return max(2, n // 2 * 2)


def _check_params(T: int, n_buckets, chunk_size, n_rounds, causal) -> int:
    """Validates; returns ``n_buckets`` (the default when ``None``)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_block_size("chunk_size", chunk_size, T, must_divide=not causal)
    if n_buckets is None:
        n_buckets = default_n_buckets(T, chunk_size, causal)
    check_int("n_buckets", n_buckets, 2)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be an even int >= 2 (argmax over [xR, -xR]), got {n_buckets!r}")
    check_positive_int("n_rounds", n_rounds)
    return n_buckets


def lsh_buckets(x: torch.Tensor, *, n_buckets: int, n_rounds: int = 1, seed: int = 0) -> torch.Tensor:
    """Angular-LSH bucket ids ``[n_rounds, B, H, T]`` of ``x [B, T, H, D]``: ``argmax([x R ; -x R])`` with
    ``R [D, n_buckets / 2]`` drawn per round and head from ``torch.Generator().manual_seed(seed)``.

    Example::

        >>> x = torch.randn(1, 8, 2, 16)
        >>> b = lsh_buckets(x, n_buckets=4, n_rounds=3)
        >>> b.shape, int(b.max()) < 4
        (torch.Size([3, 1, 2, 8]), True)
    """
    B, T, H, D = x.shape
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(n_rounds, H, D, n_buckets // 2, generator=gen).to(x.device)
    with torch.no_grad():
        xf = x.detach().float()
        out = []
        for r in range(n_rounds):
            proj = torch.einsum("bthd,hdn->bhtn", xf, rot[r])
            # argmax over [xR, -xR] without the concatenation: the largest |xR|, shifted when negative
            best = proj.abs().argmax(-1, keepdim=True)
            neg = proj.gather(-1, best) < 0
            out.append((best + neg * (n_buckets // 2)).squeeze(-1))
        return torch.stack(out)


def _rounds(
    q, k, *, n_buckets, chunk_size, n_rounds, causal, shared_qk, seed
) -> tuple[list[Round], torch.Tensor | None]:
    """The sorted rounds and, for shared-QK, which queries have a key other than themselves."""
    with torch.no_grad():
        bq = lsh_buckets(q, n_buckets=n_buckets, n_rounds=n_rounds, seed=seed)
        bk = bq if shared_qk else lsh_buckets(k, n_buckets=n_buckets, n_rounds=n_rounds, seed=seed)
        rounds = []
        for r in range(n_rounds):
            qb = bq[r]
            kb = qb if shared_qk else bk[r]  # the same object: one sort serves queries and keys
            if causal:
                rounds.append(window_round(qb, kb, 2 * chunk_size))
            else:
                rounds.append(chunk_round(qb, kb, chunk_size, look_back=True))
        other = None
        if shared_qk:
            other = torch.stack([r.length_by_query for r in rounds]).amax(0) >= 2
    return rounds, other


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    *,
    chunk_size: int,
    n_buckets: int | None = None,
    n_rounds: int = 1,
    causal: bool = False,
    shared_qk: bool = True,
    dedup: bool = True,
    seed: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Reformer LSH attention (see the module docstring). ``q [B, T, H, D]``, ``k [B, T, H_kv, D]``
    (``None`` with ``shared_qk=True``), ``v [B, T, H_kv, D_v]``; returns ``o [B, T, H, D_v]``
    (and ``lse [B, H, T]`` with ``return_lse``). ``chunk_size`` must divide ``T`` when not causal;
    ``n_buckets`` defaults to :func:`default_n_buckets`.

    Example::

        >>> q, v = torch.randn(1, 256, 2, 16), torch.randn(1, 256, 2, 16)
        >>> lsh_attention(q, None, v, chunk_size=32, n_rounds=2).shape
        torch.Size([1, 256, 2, 16])
    """
    T, gk, gv = _check_inputs(q, k, v, shared_qk)
    n_buckets = _check_params(T, n_buckets, chunk_size, n_rounds, causal)
    if not isinstance(dedup, bool):
        raise TypeError(f"dedup must be a bool, got {dedup!r}")
    scale = check_scale(scale, q.shape[-1])
    keys = torch.nn.functional.normalize(q, dim=-1) if shared_qk else expand_kv(k, gk)
    vals = expand_kv(v, gv)
    rounds, other = _rounds(
        q,
        keys,
        n_buckets=n_buckets,
        chunk_size=chunk_size,
        n_rounds=n_rounds,
        causal=causal,
        shared_qk=shared_qk,
        seed=seed,
    )
    outs, lses = [], []
    for r, rnd in enumerate(rounds):
        bm = round_mask(rnd, rounds[:r] if dedup else [], other)
        o, lse = sorted_attention(q, keys, vals, rnd, bm, scale)
        outs.append(o)
        lses.append(lse)
    o, lse = merge_states(outs, lses)
    return (o, lse) if return_lse else o


def lsh_pair_counts(
    q: torch.Tensor,
    k: torch.Tensor | None,
    *,
    chunk_size: int,
    n_buckets: int | None = None,
    n_rounds: int = 1,
    causal: bool = False,
    shared_qk: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """In how many rounds each (query, key) pair is attended: ``[B, H, T, T]`` int (small ``T`` only).

    ``lsh_attention(dedup=True)`` is exact softmax attention over ``counts > 0``; ``dedup=False`` over the
    same pairs with ``log(counts)`` added to the scores.
    """
    if shared_qk and k is not None:
        raise ValueError("shared_qk=True derives the keys from q (k = q / |q|): pass k=None")
    T = q.shape[1]
    n_buckets = _check_params(T, n_buckets, chunk_size, n_rounds, causal)
    keys = q if shared_qk else expand_kv(k, q.shape[2] // k.shape[2])
    rounds, other = _rounds(
        q,
        keys,
        n_buckets=n_buckets,
        chunk_size=chunk_size,
        n_rounds=n_rounds,
        causal=causal,
        shared_qk=shared_qk,
        seed=seed,
    )
    counts = torch.zeros(q.shape[0], q.shape[2], T, T, dtype=torch.int16, device=q.device)
    for r in rounds:
        counts += r.dense_visible()
    if other is not None:
        eye = torch.eye(T, dtype=torch.bool, device=q.device)
        counts = counts.masked_fill(eye & other[..., None], 0)
    return counts


def _attend(q, k, v, *, causal, shared_qk=True, **params):
    return lsh_attention(q, None if shared_qk else k, v, causal=causal, shared_qk=shared_qk, **params)


def _dense(q, k, *, causal, shared_qk=True, dedup=True, **params):
    if not dedup:
        return None  # a multiset (weights log N), not a mask: see lsh_pair_counts
    return lsh_pair_counts(q, None if shared_qk else k, causal=causal, shared_qk=shared_qk, **params) > 0


def _params(T: int, n_rounds: int = 1) -> dict:
    """``n_rounds`` rounds of own + previous chunk (causal: a window of two chunks) with ``chunk_size ~ T /
    (32 n_rounds)``: at most ``T / 16`` keys per query whatever the rounds (``n_buckets`` by
    :func:`default_n_buckets`, which depends on ``causal``). The registry's ``attend(q, k, v)`` uses the
    given keys, so its entries are the separate q/k variant (shared-QK derives the keys from q and is
    covered by tests/sparse/test_lsh.py)."""
    chunk = max(4, T // (32 * n_rounds))
    while T % chunk:
        chunk -= 1
    return {"chunk_size": chunk, "n_rounds": n_rounds, "shared_qk": False}


# one round (the Reformer's and Hugging Face's default), and two rounds of half the chunk at the same key
# budget: more chances to meet a similar key, paid with a second pass and its de-duplication mask
register(SparseMethod(name="lsh", attend=_attend, dense_mask=_dense, make_params=_params, content_based=True))
register(
    SparseMethod(
        name="lsh_2rounds", attend=_attend, dense_mask=_dense, make_params=lambda T: _params(T, 2), content_based=True
    )
)
