"""``python -m effattn bench sparse``: every registered sparse / content-routed method against SDPA.

For each method of :data:`effattn.sparse.REGISTRY` with its ``make_params(T)`` (about 1/16 of the keys
per query), each of its causal modes and each length (default 4k, 16k, 64k; ``--quick``: 2k, 4k),
``B = 1, H = 4, D = 64``, float32:

- forward (under ``no_grad``) and forward+backward time (median of repeats after a warm-up) and the
  peak memory rise of each;
- the speed-up over dense SDPA of the same causality (``is_causal`` or no mask) and over SDPA causal;
- SDPA with the method's dense boolean mask (its selection, materialized) where that fits a memory
  budget (skipped with a note above it);
- the score entries per query and head the tiled engine computes (``scores_per_query``: every entry of
  its score tiles, masked or not) and keeps (``visible_per_query``), counted by
  :func:`effattn.exact.count_scores` in one forward, and ``fwdbwd_eff``: useful FLOP/s over the visible
  pairs against the machine's GEMM rate measured in the same run;
- the *attention mass kept*: ``exp(lse_selected - lse_full)`` per query, the share of the full softmax
  (causal or not, as the method runs) that the selection covers, averaged over queries, on random
  inputs and on inputs with planted clusters (queries and keys drawn around 16 shared centres per
  head, so the mass concentrates on a query's cluster; routing's centroids are first fitted by k-means on
  another draw of the same kind). ``lse_selected`` comes from the method itself
  (``return_lse=True``) when it offers it, else from its dense mask (small ``T`` only); the full
  ``lse`` is computed exactly, query chunk by query chunk (``O(T)`` memory per chunk), on every query
  up to 4k and on 1024 evenly spaced queries above. HyperAttention's ``lse`` includes the sampled
  estimate, so its mass is that of its sortLSH part (``num_samples=0``).
"""

from __future__ import annotations

import argparse
import inspect

import torch

import effattn.sparse as sparse
from effattn.bench import suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.harness import (
    attention_flops,
    command_line,
    machine_info,
    matmul_flops_per_second,
    measure_peak_memory,
    measure_time,
    paired_ratio,
    run_guarded,
    write_report,
)
from effattn.bench.table import Column, print_table
from effattn.exact import count_scores

B, H, D = 1, 4, 64
N_CENTRES = 16
SDPA_MASK_BUDGET_ELEMENTS = 2**28  # B*H*T*T: the dense mask and SDPA's float bias (4 GiB) at most
DENSE_MASS_MAX_T = 4096  # mass from a dense mask only up to here
SUBSAMPLE_ABOVE = 4096  # full-attention lse on every query up to here, on SUBSAMPLE queries above
SUBSAMPLE = 1024
QUICK_LENGTHS = [2048, 4096]
LENGTHS = [4096, 16384, 65536]


def _inputs(T: int, kind: str, seed: int, device: str):
    """``(q, k, v)`` of shape ``[B, T, H, D]``: ``random`` (standard normal) or ``clustered`` (planted clusters)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    elif kind == "clustered":
        # the centres define the distribution (the same for every draw); labels and noise vary with the seed
        g_centres = torch.Generator().manual_seed(1234)
        centres = 6.0 * torch.nn.functional.normalize(torch.randn(H, N_CENTRES, D, generator=g_centres), dim=-1)
        label = torch.randint(0, N_CENTRES, (B, T, H), generator=g)
        base = centres[torch.arange(H).view(1, 1, H), label]
        q = base + 0.5 * torch.randn(B, T, H, D, generator=g)
        k = base + 0.5 * torch.randn(B, T, H, D, generator=g)
        v = torch.randn(B, T, H, D, generator=g)
    else:
        raise KeyError(kind)
    return q.to(device), k.to(device), v.to(device)


def _query_rows(T: int, device) -> torch.Tensor:
    if T <= SUBSAMPLE_ABOVE:
        return torch.arange(T, device=device)
    return torch.linspace(0, T - 1, SUBSAMPLE, device=device).round().long()


def full_lse(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool, chunk: int = 128) -> torch.Tensor:
    """Exact log-sum-exp of the full (causal or not) attention for the query ``rows``: ``[B, H, len(rows)]``."""
    scale = q.shape[-1] ** -0.5
    kt = k.float().permute(0, 2, 3, 1)  # [B, H, D, T]
    pos = torch.arange(k.shape[1], device=k.device)
    out = []
    for i in range(0, rows.numel(), chunk):
        r = rows[i : i + chunk]
        s = (q[:, r].float().transpose(1, 2) @ kt) * scale  # [B, H, c, T]
        if causal:
            s = s.masked_fill(pos.view(1, 1, 1, -1) > r.view(1, 1, -1, 1), float("-inf"))
        out.append(torch.logsumexp(s, -1))
    return torch.cat(out, -1)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def fitted_router(num_clusters: int, T: int, kind: str, device, steps: int = 10):
    """A :class:`~effattn.sparse.KMeansRouter` after ``steps`` EMA k-means steps on another draw of the
    same kind of input (the Routing Transformer learns its centroids on the data distribution)."""
    router = sparse.KMeansRouter(H, D, num_clusters, decay=0.5, seed=0).to(device)
    q, k, _ = _inputs(T, kind, 99, device)
    for _ in range(steps):
        router.update(q, k)
    return router.eval()


def mass_kept(method, params: dict, q, k, v, causal: bool, kind: str = "random") -> tuple[float | None, str | None]:
    """Mean kept attention mass of ``method`` on these inputs, or ``(None, why not)``."""
    T = q.shape[1]
    rows = _query_rows(T, q.device)
    with torch.no_grad():
        if method.name == "routing" and "num_clusters" in params:
            p = {**params, "router": fitted_router(params["num_clusters"], T, kind, q.device), "num_clusters": None}
            _, lse = method.attend(q, k, v, causal=causal, return_lse=True, **p)
            lse = lse[..., rows]
        elif method.name == "hyper_attention":
            p = {**params, "num_samples": 0}
            _, lse = method.attend(q, k, v, causal=causal, return_lse=True, **p)
            lse = lse[..., rows]
        elif _accepts(method.attend, "return_lse"):
            _, lse = method.attend(q, k, v, causal=causal, return_lse=True, **params)
            lse = lse[..., rows]
        elif method.dense_mask is not None and T <= DENSE_MASS_MAX_T:
            mask = method.dense_mask(q, k, causal=causal, **params)
            if mask is None:
                return None, "no dense selection and no return_lse"
            s = torch.einsum("bthd,bshd->bhts", q[:, rows].float(), k.float()) * q.shape[-1] ** -0.5
            lse = torch.logsumexp(s.masked_fill(~mask.expand(B, H, T, T)[..., rows, :], float("-inf")), -1)
        elif method.dense_mask is not None:
            return None, f"no return_lse, and the dense mask is not materialized above T={DENSE_MASS_MAX_T}"
        else:
            return None, "no dense selection and no return_lse"
        ref = full_lse(q, k, rows, causal)
        kept = torch.exp(lse - ref).nan_to_num(0.0)  # a query with no selected key keeps 0
    return float(kept.mean()), None


def _fwd_bwd(fn, inputs):
    """A forward+backward call of ``fn`` (a fixed random output gradient; input grads cleared)."""
    do = None

    def run():
        nonlocal do
        o = fn()
        if do is None:
            do = torch.randn_like(o)
        o.backward(do)
        for x in inputs:
            x.grad = None

    return run


def _timed(fn, inputs, repeats: int, device: str, backward: bool) -> dict:
    def fwd():
        with torch.no_grad():
            return fn()

    fwd_bwd = _fwd_bwd(fn, inputs)
    out = {"fwd_s": measure_time(fwd, repeats=repeats, device=device)}
    out["fwd_mem_MiB"] = (measure_peak_memory(fwd, device) or 0) / 2**20
    if backward:
        out["fwdbwd_s"] = measure_time(fwd_bwd, repeats=repeats, device=device)
        out["fwdbwd_mem_MiB"] = (measure_peak_memory(fwd_bwd, device) or 0) / 2**20
    return out


def _sdpa_call(T: int, causal: bool, device, mask: torch.Tensor | None = None):
    """``(fn, inputs)``: SDPA on fresh ``[B, H, T, D]`` inputs, causal, with ``mask``, or full."""
    q, k, v = (torch.randn(B, H, T, D, device=device, requires_grad=True) for _ in range(3))
    if mask is None:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    else:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    return fn, (q, k, v)


def _sdpa(T: int, causal: bool, args, mask: torch.Tensor | None = None) -> dict:
    fn, inputs = _sdpa_call(T, causal, args.device, mask)
    row = _timed(fn, inputs, args.repeats, args.device, not args.forward_only)
    if mask is None:
        row["visible_per_query"] = (T + 1) / 2 if causal else T
    return row


def _measure_method(method, T: int, causal: bool, args) -> tuple[dict, torch.Tensor | None]:
    params = method.make_params(T)
    q, k, v = (x.requires_grad_(True) for x in _inputs(T, "random", 0, args.device))
    call = lambda: method.attend(q, k, v, causal=causal, **params)  # noqa: E731
    row = _timed(call, (q, k, v), args.repeats, args.device, not args.forward_only)
    if args.paired and not args.forward_only:
        sdpa, sdpa_inputs = _sdpa_call(T, True, args.device)
        row["speedup_vs_causal_paired"] = paired_ratio(
            _fwd_bwd(sdpa, sdpa_inputs), _fwd_bwd(call, (q, k, v)), repeats=args.repeats, device=args.device
        )
    with torch.no_grad(), count_scores() as n:
        method.attend(q, k, v, causal=causal, **params)
    row["scores_per_query"] = n.computed / (B * H * T)
    row["visible_per_query"] = n.visible / (B * H * T)
    mask = None
    if method.dense_mask is not None and B * H * T * T <= SDPA_MASK_BUDGET_ELEMENTS:
        with torch.no_grad():
            mask = method.dense_mask(q, k, causal=causal, **params)
        if mask is not None:
            mask = mask.expand(B, H, T, T)
            row["density"] = float(mask.float().mean())
    for kind in ("random", "clustered"):
        qm, km, vm = _inputs(T, kind, 1, args.device)
        m, why = mass_kept(method, params, qm, km, vm, causal, kind)
        row[f"mass_{kind}"] = m
        if why:
            row["note"] = why
    return row, mask


def _run_length(T: int, args, gemm: float, rows: list[dict], notes: list[str]) -> None:
    base = {}
    for causal in (True, False):
        r = {"T": T, "method": "sdpa", "causal": causal, **run_guarded(lambda c=causal: _sdpa(T, c, args))}
        _efficiency(r, gemm)
        base[causal] = r
        rows.append(r)
        _progress(r)
    for name, method in sorted(sparse.REGISTRY.items()):
        for causal in method.causal_modes:
            r = {"T": T, "method": name, "causal": causal, "params": _fmt_params(method.make_params(T))}
            box: list = []

            def one(method=method, causal=causal, box=box):
                out, mask = _measure_method(method, T, causal, args)
                box.append(mask)
                return out

            r.update(run_guarded(one))
            _speedups(r, base)
            _efficiency(r, gemm)
            rows.append(r)
            _progress(r)
            mask = box[0] if box else None
            if mask is not None:
                m = {"T": T, "method": f"sdpa+mask[{name}]", "causal": causal}
                m.update(run_guarded(lambda mask=mask, causal=causal: _sdpa(T, causal, args, mask)))
                m["visible_per_query"] = r.get("visible_per_query")
                _efficiency(m, gemm)
                rows.append(m)
                _progress(m)
            elif method.dense_mask is not None and B * H * T * T > SDPA_MASK_BUDGET_ELEMENTS:
                notes.append(f"T={T} {name}: SDPA with the dense mask skipped (B*H*T*T > 2^28 elements)")


# the terminal summary (the report files hold every column)
TERMINAL_COLUMNS = (
    Column("T", key_column=True),
    Column("method", text=True, min_width=14, key_column=True),
    Column("causal", "c", key_column=True),
    Column("fwdbwd_s", "f+b ms", scale=1e3),
    Column("fwdbwd_mem_MiB", "f+b MiB"),
    Column("speedup_vs_causal", "x causal"),
    Column("speedup_vs_causal_paired", "x paired"),
    Column("visible_per_query", "keys/q"),
    Column("fwdbwd_eff", "eff%", scale=100),
    Column("mass_random", "mass r"),
    Column("mass_clustered", "mass c"),
    Column("remark", text=True),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sparse suite's options."""
    add_common_arguments(p, "sparse", lengths=LENGTHS, quick_lengths=QUICK_LENGTHS, quick="small sizes")
    p.add_argument("--forward-only", action="store_true", help="skip the forward+backward measurements")
    p.add_argument(
        "--paired",
        action="store_true",
        help="also time SDPA causal back to back with each method (speedup_vs_causal_paired)",
    )


@suite(
    "sparse",
    add_arguments=add_arguments,
    summary="every sparse / content-routed method against SDPA: time, memory, scores, attention mass",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (QUICK_LENGTHS if args.quick else LENGTHS)
    torch.manual_seed(0)
    gemm = matmul_flops_per_second(args.device)
    print(f"matmul rate: {gemm / 1e9:.1f} GFLOP/s (float32)", flush=True)
    rows: list[dict] = []
    skipped: list[str] = []
    for T in lengths:
        _run_length(T, args, gemm, rows, skipped)
    notes = [
        f"B={B}, H={H}, D={D}, float32; params from each method's make_params(T) (about 1/16 of the keys per query)",
        "speedup = SDPA (same causality, no mask) time / method time; speedup_vs_causal against SDPA is_causal",
        "speedup_vs_causal_paired (--paired) = median over repeats of SDPA causal fwd+bwd time / the method's, "
        "the two timed back to back (the drift of a shared machine cancels within a pair)",
        "fwd timed under no_grad; peak memory = rise of the process's peak RSS over the RSS before the call (CPU)",
        "mass = mean over queries of exp(lse_selected - lse_full); clustered = q, k around 16 planted centres "
        f"per head; every query up to T={SUBSAMPLE_ABOVE}, {SUBSAMPLE} evenly spaced queries above",
        "hyper_attention's mass is that of its sortLSH part (its lse includes the sampled estimate); routing's "
        "mass uses centroids fitted by 10 k-means EMA steps on another draw of the same kind of input "
        "(its timing uses make_params' fixed random centroids)",
        "density = fraction of (query, key) pairs in the dense selection (where it was materialized)",
        "scores_per_query = score entries the tiled engine computes per query and head (every entry of its "
        "score tiles, masked or not, padding included; counted by effattn.exact.count_scores in one forward), "
        "visible_per_query = the unmasked ones (the keys the selection keeps; SDPA: (T+1)/2 causal, T not)",
        f"fwdbwd_eff = useful FLOP/s (4*D per visible pair, fwd+bwd counted 3.5x fwd) / the matmul rate "
        f"{gemm / 1e9:.1f} GFLOP/s measured in this run",
        *skipped,
    ]
    meta = {"command": command_line(), "machine": machine_info(args.device), "lengths": lengths}
    meta.update({"B": B, "H": H, "D": D, "gemm_flops": gemm})
    cols = [
        "T",
        "method",
        "causal",
        "params",
        "fwd_s",
        "fwdbwd_s",
        "fwd_mem_MiB",
        "fwdbwd_mem_MiB",
        "speedup_fwd",
        "speedup_fwdbwd",
        "speedup_vs_causal",
        "speedup_vs_causal_paired",
        "scores_per_query",
        "visible_per_query",
        "fwdbwd_eff",
        "density",
        "mass_random",
        "mass_clustered",
        "note",
        "error",
    ]
    path = write_report(args.out, "sparse", rows, cols, meta=meta, notes=notes)
    shown = [{**r, "causal": "y" if r["causal"] else "n", "remark": r.get("error") or r.get("note")} for r in rows]
    print_table(
        "sparse: x = speed-up over SDPA causal; mass r/c = kept on random/clustered inputs",
        shown,
        TERMINAL_COLUMNS,
    )
    print(f"report: {path}")


def _speedups(r: dict, base: dict) -> None:
    same, causal = base.get(r["causal"], {}), base.get(True, {})
    for key, col in (("fwd_s", "speedup_fwd"), ("fwdbwd_s", "speedup_fwdbwd")):
        if r.get(key) and same.get(key):
            r[col] = same[key] / r[key]
    if r.get("fwdbwd_s") and causal.get("fwdbwd_s"):
        r["speedup_vs_causal"] = causal["fwdbwd_s"] / r["fwdbwd_s"]


def _efficiency(r: dict, gemm: float) -> None:
    """``fwdbwd_eff``: useful FLOP/s over the visible pairs (backward counted 2.5x the forward) / the GEMM rate."""
    if r.get("fwdbwd_s") and r.get("visible_per_query"):
        useful = 3.5 * attention_flops(B, H, D, D, r["T"] * r["visible_per_query"])
        r["fwdbwd_eff"] = useful / r["fwdbwd_s"] / gemm


def _fmt_params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _progress(r: dict) -> None:
    """One line per measured row while the suite runs (the table comes at the end)."""
    what = r.get("error") or f"fwd {1e3 * r['fwd_s']:.3g} ms" + (
        f", fwd+bwd {1e3 * r['fwdbwd_s']:.3g} ms" if r.get("fwdbwd_s") else ""
    )
    print(f"T={r['T']} {r['method']} ({'causal' if r['causal'] else 'full'}): {what}", flush=True)


def hip_selection_cost(
    lengths=(16384, 32768, 65536),
    *,
    block: int = 64,
    top_k: int = 16,
    heads: int = 2,
    repeats: int = 3,
    kind: str = "clustered",
    seed: int = 0,
) -> list[dict]:
    """Time of HiP's selection alone (:func:`effattn.sparse.hip_selection`, first-key representatives,
    ``O(T / block * k log T)``) against the brute-force block top-k it approximates
    (:func:`effattn.sparse.brute_force_topk_blocks`: every key scored, ``O(T^2 / block)``), timed back to
    back (``repeats`` pairs after a warm-up; median, min, max of each and the median paired ratio), at
    ``B = 1``, ``heads``, ``D = 64``, float32, no grad. ``recall``: the share of brute force's selected
    blocks that HiP also selects, over query blocks with more than ``top_k`` candidates. ``kind``:
    ``random``, ``clustered`` (as the sparse suite's inputs: a cluster per token, no locality) or
    ``runs`` (a cluster per run of 256 tokens, so a block's keys resemble their neighbours', the
    locality HiP's representatives rely on).

    Example::

        >>> r = hip_selection_cost([1024], block=64, top_k=2, repeats=1)[0]
        >>> r["T"], r["levels"], 0 <= r["recall"] <= 1
        (1024, 3, True)
    """
    from effattn.bench.harness import paired_times

    rows = []
    for T in lengths:
        if kind == "runs":  # clustered, with one cluster per run of 256 tokens: neighbouring keys alike
            g = torch.Generator().manual_seed(seed)
            g_centres = torch.Generator().manual_seed(1234)
            centres = 6.0 * torch.nn.functional.normalize(torch.randn(heads, N_CENTRES, D, generator=g_centres), dim=-1)
            label = torch.randint(0, N_CENTRES, (1, -(-T // 256), heads), generator=g).repeat_interleave(256, 1)[:, :T]
            base = centres[torch.arange(heads).view(1, 1, heads), label]
            q, k = (base + 0.5 * torch.randn(1, T, heads, D, generator=g) for _ in range(2))
        else:
            q, k, _ = _inputs(T, kind, seed, "cpu")
            q, k = q[:, :, :heads].contiguous(), k[:, :, :heads].contiguous()
        with torch.no_grad():
            pair = paired_times(
                lambda q=q, k=k: sparse.hip_selection(q, k, block=block, top_k=top_k),
                lambda q=q, k=k: sparse.brute_force_topk_blocks(q, k, block=block, top_k=top_k),
                repeats=repeats,
            )
            idx, valid = sparse.hip_selection(q, k, block=block, top_k=top_k)
            ref, ref_valid = sparse.brute_force_topk_blocks(q, k, block=block, top_k=top_k)
        n = idx.shape[2]
        full = slice(top_k + 1, n)  # query blocks with more candidates than top_k
        hit = (idx[:, :, full, :, None] == ref[:, :, full, None, :]).any(-2) & ref_valid[:, :, full]
        recall = float(hit.sum() / ref_valid[:, :, full].sum().clamp(min=1))
        rows.append(
            {
                "T": T,
                "block": block,
                "top_k": top_k,
                "heads": heads,
                "levels": max(1, (-(-(n - 1) // top_k) - 1).bit_length()),  # ceil(log2(ceil((n - 1) / k)))
                "hip_s": pair.a.median,
                "hip_min_s": pair.a.min,
                "hip_max_s": pair.a.max,
                "brute_s": pair.b.median,
                "brute_min_s": pair.b.min,
                "brute_max_s": pair.b.max,
                "brute_over_hip": 1.0 / pair.ratio,
                "repeats": repeats,
                "recall": recall,
                "kind": kind,
            }
        )
    return rows
