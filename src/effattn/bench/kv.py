"""``python -m effattn bench kv``: passkey retrieval under every KV policy and the quantized cache.

A small attention LM (:mod:`effattn.bench.passkey_lm`; :class:`effattn.nn.LM`: 2 layers, width
64, 2 heads, partial RoPE on a quarter of each head's channels, no sliding window) is trained here on
generated passkey prompts (:mod:`effattn.bench.tasks.passkey`) until it retrieves the key with its
full cache: the base stages on prompts of up to 2k tokens, then the ``extend`` stages on 1k-8k
prompts from the base weights. The weights of both are cached under ``--cache-dir``
(:meth:`~effattn.nn.LM.save`), keyed by the training settings, so a rerun skips training. Training
is deterministic given ``--seed``.

Then for each context length (default 2k, 4k, 8k; ``--quick``: 256, 512) ``N`` prompts
(``--prompts``) hide the key at depths spread evenly over ``[0, 1]``, and each method prefills them
as one batch and decodes greedily:

- ``full``: the contiguous cache (compression ratio 0: every policy at ratio 0 keeps every token,
  :class:`effattn.kv.CompressedKVCache` then equals a full cache exactly, so this row stands for all);
- every policy of :func:`effattn.kv.list_policies` at each ``--ratios`` (fraction of the context
  removed, per layer and kv head; DuoAttention's retrieval heads keep every token, its ratio applies
  to the streaming heads, and its heads are found once by :func:`effattn.kv.calibrate_duo_attention`);
- KIVI (:class:`effattn.kv.QuantizedKVCache`) at 2 and 4 bits, its defaults otherwise.

Per row: ``accuracy`` (every digit right), ``digit_acc``, ``cache_bytes`` (keys and values held per
sequence after the prefill; policies' positions/scores bookkeeping not included) and
``cache_frac`` (over the full cache), ``prefill_s`` (one prefill of the batch) and decode
``tok_per_s`` (``N`` sequences / the median decode step time), ``mass_kept`` (the attention mass of the last prompt
query, the ``QUERY`` token whose attention must find the key, over the keys the policy kept, under
the full model's attention probabilities: exact, since the prefill itself attends to every token
and evicts after it; mean over prompts, layers and query heads) and ``needle_kept`` (share of the
``(layer, kv head, needle token)`` triples kept).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from effattn.bench import suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.harness import command_line, machine_info, run_guarded, write_report
from effattn.bench.passkey_lm import MAX_SEQ_LEN, QUICK_MODEL, PasskeyModelConfig, load_or_train, train_passkey_lm
from effattn.bench.table import Column, format_value, print_table
from effattn.bench.tasks.passkey import PasskeyBatch, make_passkey

# the passkey LM lives in effattn.bench.passkey_lm; its names are re-exported here, where they were first
__all__ = [
    "QUICK_MODEL",
    "PasskeyModelConfig",
    "add_arguments",
    "default_cache_dir",
    "load_or_train",
    "methods",
    "prompts_at",
    "reference_probs",
    "run",
    "run_length",
    "run_method",
    "train_passkey_lm",
    "write_plot",
]

LENGTHS = [2048, 4096, MAX_SEQ_LEN]
QUICK_LENGTHS = [256, 512]
RATIOS = [0.25, 0.5, 0.75, 0.9]
QUICK_RATIOS = [0.5, 0.9]
KIVI_BITS = (2, 4)
DECODE_TOKENS = 16  # decoded per prompt (the answer's digits, then more for the timing)
QUICK_DECODE_TOKENS = 8
JITTER = 0.004  # vertical offset between policy lines in the plot (accuracy units)


# ------------------------------------------------------------------------------------------------
# one method on one batch of prompts
# ------------------------------------------------------------------------------------------------


def _attention_layers(model) -> list[int]:
    return model.policy_layers()


def _capture_inputs(model, layers: list[int]):
    """Forward hooks recording each attention mixer's input ``x`` (the normed hidden states)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        model.blocks[i].mixer.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0].detach()))
        for i in layers
    ]
    return seen, hooks


def _last_query_probs(mixer, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities ``[B, H_q, T]`` of the last query of ``x [B, T, dim]`` over the
    RoPE'd ``keys [B, T, H_kv, D]`` of the full cache, as :class:`effattn.nn.Attention` computes it."""
    B, T = x.shape[:2]
    q = mixer.q_proj(x[:, -1:]).view(B, 1, mixer.heads, mixer.head_dim)
    if mixer.q_norm is not None:
        q = mixer.q_norm(q)
    if mixer.rope is not None:
        q = mixer.rope.apply(q, torch.tensor([T - 1], device=x.device))
    g = mixer.heads // mixer.kv_heads
    k = keys.float().repeat_interleave(g, dim=2)  # [B, T, H_q, D]
    s = torch.einsum("bhd,bthd->bht", q[:, 0].float(), k) * mixer.head_dim**-0.5
    return s.softmax(-1)


@torch.no_grad()
def reference_probs(model, prompts: torch.Tensor) -> list[torch.Tensor]:
    """Per attention layer, the full model's attention of the last prompt query: ``[B, H_q, T]``."""
    layers = _attention_layers(model)
    seen, hooks = _capture_inputs(model, layers)
    try:
        state = model.cache_state("contiguous")
        model(prompts, state)
    finally:
        for h in hooks:
            h.remove()
    return [_last_query_probs(model.blocks[i].mixer, seen[i], state[i].k) for i in layers]


def _kept_stats(cache, probs: list[torch.Tensor], needle_pos: torch.Tensor, needle_len: int, heads_q: int):
    """``(mass_kept, needle_kept)`` of a :class:`~effattn.kv.CompressedKVCache` after the prefill."""
    masses, needles = [], []
    for n, p in enumerate(probs):
        pos = cache.positions(n)  # [B, H_kv, T_max], -1 at padding
        B, Hkv, _ = pos.shape
        g = heads_q // Hkv
        valid = pos >= 0
        idx = pos.clamp(min=0).repeat_interleave(g, dim=1)  # [B, H_q, T_max]
        kept = p.gather(2, idx) * valid.repeat_interleave(g, dim=1)
        masses.append(kept.sum(-1))  # [B, H_q]
        off = pos[..., None] - needle_pos.view(B, 1, 1, 1).to(pos)  # [B, H_kv, T_max, 1]
        hit = (valid[..., None] & (off >= 0) & (off < needle_len)).any(-1)  # a kept needle token
        needles.append(hit.sum(-1).float() / needle_len)  # [B, H_kv]
    return float(torch.stack(masses).mean()), float(torch.stack(needles).mean())


def _state_bytes(state: list, layers: list[int]) -> int:
    caches = {id(state[i].cache if hasattr(state[i], "cache") else state[i]): state[i] for i in layers}
    total = 0
    for s in caches.values():
        total += s.cache.nbytes if hasattr(s, "cache") else s.nbytes
    return total


@torch.no_grad()
def run_method(model, batch, make_state, decode_tokens: int, probs=None) -> dict:
    """Prefill ``batch.prompts`` with the state ``make_state()``, decode ``decode_tokens`` tokens
    greedily (the first from the prefill's logits), score the answer's digits.

    Timing: the prefill once; decoding as the median of the per-step times after the first step
    (``tok_per_s = batch / median step``)."""
    layers = _attention_layers(model)
    prompts = batch.prompts
    N, nd = prompts.shape[0], batch.keys.shape[1]
    steps = max(decode_tokens, nd, 3)
    state = make_state()
    t0 = time.perf_counter()
    logits, state = model(prompts, state)
    prefill_s = time.perf_counter() - t0
    held = _state_bytes(state, layers)
    cache = getattr(state[layers[0]], "cache", None)
    kept = None
    if probs is not None and cache is not None and hasattr(cache, "positions"):
        kept = _kept_stats(cache, probs, batch.needle_pos, nd + 1, model.blocks[layers[0]].mixer.heads)
    out, step_s = [logits[:, -1].argmax(-1)], []
    for _ in range(steps - 1):
        t0 = time.perf_counter()
        logits, state = model(out[-1][:, None], state)
        out.append(logits[:, -1].argmax(-1))
        step_s.append(time.perf_counter() - t0)
    pred = torch.stack(out, 1)[:, :nd]
    right = pred == batch.keys
    row = {
        "accuracy": float(right.all(1).float().mean()),
        "digit_acc": float(right.float().mean()),
        "cache_bytes": held / N,
        "prefill_s": prefill_s,
        "tok_per_s": N / statistics.median(step_s[1:]),
    }
    if kept is not None:
        row["mass_kept"], row["needle_kept"] = kept
    return row


# ------------------------------------------------------------------------------------------------
# the suite
# ------------------------------------------------------------------------------------------------


def _csv(s: str | None, cast, default):
    return [cast(x) for x in s.split(",") if x.strip()] if s else list(default)


def methods(policies: list[str], ratios: list[float], duo_heads, kivi_bits) -> list[tuple[str, float | None, dict]]:
    """``(method, ratio, how)`` for every row of one length (``how``: ``policy``/``cache`` settings)."""
    out = [("full", 0.0, {"cache": "contiguous"})]
    for name in policies:
        for r in ratios:
            kw = {"retrieval_heads": duo_heads} if name == "duo_attention" and duo_heads is not None else {}
            out.append((name, r, {"policy": name, "kw": kw}))
    for bits in kivi_bits:
        out.append((f"kivi_{bits}bit", None, {"kivi": bits}))
    return out


def _state_factory(model, how: dict):
    from effattn.kv import QuantizedKVCache, make_policy

    if "policy" in how:
        return lambda: model.compressed_state(make_policy(how["policy"], ratio=how["ratio"], **how["kw"]))
    if "kivi" in how:
        return lambda: model.cache_state(functools.partial(QuantizedKVCache, bits=how["kivi"]))
    return lambda: model.cache_state("contiguous")


def prompts_at(T: int, n: int, cfg: PasskeyModelConfig, seed: int):
    """``n`` passkey prompts of ``T`` tokens, needle depths evenly spaced over ``[0, 1]``, as one batch."""
    depths = [i / max(1, n - 1) for i in range(n)]
    parts = [
        make_passkey(1, T, cfg.num_digits, cfg.vocab_size, depth=d, seed=seed + 1000 + i) for i, d in enumerate(depths)
    ]
    return PasskeyBatch(**{f: torch.cat([getattr(p, f) for p in parts]) for f in vars(parts[0])})


def run_length(
    model, cfg, T: int, n_prompts: int, seed: int, rows_spec, device: str, decode_tokens: int = DECODE_TOKENS
) -> list[dict]:
    """Every method of ``rows_spec`` (:func:`methods`) on the same ``n_prompts`` prompts of ``T`` tokens."""
    batch = prompts_at(T, n_prompts, cfg, seed)
    batch.prompts, batch.keys = batch.prompts.to(device), batch.keys.to(device)
    probs = reference_probs(model, batch.prompts)
    rows, full_bytes = [], None
    for name, ratio, how in rows_spec:
        make_state = _state_factory(model, {**how, "ratio": ratio})
        row = {"T": T, "method": name, "ratio": ratio}
        row.update(run_guarded(lambda m=make_state: run_method(model, batch, m, decode_tokens, probs)))
        if name == "full":
            full_bytes = row.get("cache_bytes")
            row.update(mass_kept=1.0, needle_kept=1.0)
        if full_bytes and row.get("cache_bytes") is not None:
            row["cache_frac"] = row["cache_bytes"] / full_bytes
        rows.append(row)
        _progress(row)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The kv suite's options."""
    add_common_arguments(
        p,
        "kv",
        lengths=LENGTHS,
        quick_lengths=QUICK_LENGTHS,
        quick="a 5-step model, short contexts, 4 prompts, ratios " + ",".join(map(str, QUICK_RATIOS)),
        repeats=None,
        lengths_help="comma-separated context lengths of the passkey prompts",
    )
    p.add_argument(
        "--cache-dir",
        type=str,
        default=None,
        metavar="DIR",
        help="where trained model weights are kept and looked up (default: $XDG_CACHE_HOME/effattn or "
        "~/.cache/effattn)",
    )
    p.add_argument(
        "--policies",
        type=str,
        default=None,
        metavar="A,B,...",
        help="comma-separated KV policies (default: every registered policy)",
    )
    p.add_argument(
        "--ratios",
        type=str,
        default=None,
        metavar="R1,R2,...",
        help="comma-separated compression ratios, the fraction of the context removed (default: "
        + ",".join(map(str, RATIOS))
        + "; with --quick: "
        + ",".join(map(str, QUICK_RATIOS))
        + ")",
    )
    p.add_argument(
        "--prompts", type=int, default=None, metavar="N", help="prompts per context length (default: 16; --quick: 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="training and prompt seed (default: %(default)s)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effattn"


@suite(
    "kv",
    add_arguments=add_arguments,
    summary="passkey retrieval under every KV policy and the quantized cache (a small LM trained here)",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    from effattn.kv import calibrate_duo_attention, list_policies

    torch.manual_seed(0)
    quick = bool(getattr(args, "quick", False))
    seed = getattr(args, "seed", 0) or 0
    cfg = QUICK_MODEL if quick else PasskeyModelConfig()
    cfg = PasskeyModelConfig(**{**asdict(cfg), "seed": seed})
    lengths = _csv(args.lengths, int, QUICK_LENGTHS if quick else LENGTHS)
    ratios = _csv(getattr(args, "ratios", None), float, QUICK_RATIOS if quick else RATIOS)
    policies = _csv(getattr(args, "policies", None), str, list_policies())
    n_prompts = getattr(args, "prompts", None) or (4 if quick else 16)
    cache_dir = getattr(args, "cache_dir", None) or default_cache_dir()
    device = args.device
    decode_tokens = QUICK_DECODE_TOKENS if quick else DECODE_TOKENS

    model, train_info = load_or_train(cfg, cache_dir, device)
    print(f"model: {train_info.get('path') or 'not saved'} (cached={train_info['cached']})", flush=True)
    notes: list[str] = []
    duo_heads = None
    if "duo_attention" in policies:
        duo_heads, duo_scores = calibrate_duo_attention(
            model, method="error", retrieval_fraction=0.25, seed=seed, return_scores=True
        )
        notes.append(
            "duo_attention: retrieval heads (layer x kv head) "
            f"{duo_heads.int().tolist()} from calibrate_duo_attention(method='error', retrieval_fraction=0.25) "
            f"on its own synthetic passkey data; per-head scores "
            f"{[[round(float(x), 4) for x in r] for r in duo_scores]}"
        )

    machine = machine_info(device)
    meta = {
        "command": command_line(),
        "machine": machine,
        "lengths": lengths,
        "ratios": ratios,
        "policies": policies,
        "prompts": n_prompts,
        "model": asdict(cfg),
        "train": train_info,
        "decode_tokens": decode_tokens,
    }
    source = f"loaded from {train_info.get('path')}" if train_info["cached"] else "trained in this run"
    notes = [
        f"model: effattn.nn.LM, {cfg.layers} attention layers, dim {cfg.dim}, {cfg.heads} heads (MHA), RoPE on "
        f"{cfg.rope_fraction:g} of each head's channels, no window; trained {cfg.steps} steps on passkey prompts, "
        f"stages (steps, min_len, max_len, tokens/step) {[list(s) for s in cfg.stages]}"
        + (f", then extend {[list(s) for s in cfg.extend]} at lr {cfg.extend_lr:g}" if cfg.extend else "")
        + f" ({source})",
        f"{n_prompts} prompts per length, needle depths evenly spaced in [0, 1]; {cfg.num_digits}-digit keys; greedy "
        f"decoding; accuracy = all digits right",
        "ratio = fraction of the context removed per (layer, kv head); full = contiguous cache (every policy at "
        "ratio 0 keeps every token and equals it)",
        f"cache_bytes: K/V bytes held per sequence after the prefill (float32); tok_per_s: batch of {n_prompts} "
        f"sequences / median decode step time (steps 2-{decode_tokens - 1} of one greedy decode); prefill_s: one "
        "prefill of the batch (one run each: indicative where the CPU is shared)",
        "mass_kept: attention of the last prompt query (QUERY) over the kept keys under the full model's "
        "probabilities, mean over prompts, layers, query heads; needle_kept: share of (layer, kv head, needle token) "
        "kept; neither applies to KIVI (it keeps every token, quantized)",
        *notes,
    ]
    rows: list[dict] = []
    for i, T in enumerate(lengths):
        spec = methods(policies, ratios, duo_heads, KIVI_BITS)
        rows += run_length(model, cfg, T, n_prompts, seed, spec, device, decode_tokens)
        done = "" if i == len(lengths) - 1 else f"partial report: lengths {lengths[: i + 1]} of {lengths} done"
        path = _write(args.out, rows, meta, notes + ([done] if done else []), machine)
    print_table("kv: passkey retrieval per KV policy and compression ratio", rows, TERMINAL_COLUMNS)
    print(f"report: {path}")


COLUMNS = [
    "T",
    "method",
    "ratio",
    "accuracy",
    "digit_acc",
    "cache_bytes",
    "cache_frac",
    "mass_kept",
    "needle_kept",
    "prefill_s",
    "tok_per_s",
    "error",
]


def _write(out, rows: list[dict], meta: dict, notes: list[str], machine: dict) -> Path:
    """``kv.json``, ``kv.md`` (harness report writer) and ``kv_accuracy.png``, linked from the markdown."""
    path = write_report(out, "kv", rows, COLUMNS, meta=meta, notes=notes)
    plot = write_plot(Path(out), rows, machine)
    if plot:
        path.write_text(path.read_text() + f"\n![accuracy vs compression ratio]({plot})\n")
    return path


def _plot_label(machine: dict) -> str:
    hw = machine.get("gpu") or machine.get("cpu_model") or machine.get("processor", "")
    from effattn import __version__ as effattn_version

    return (
        f"{hw} | effattn {effattn_version} | torch {machine.get('torch')} | python {machine.get('python')} "
        f"| {machine.get('torch_threads')} threads"
    )


def write_plot(out: Path, rows: list[dict], machine: dict) -> str | None:
    """``kv_accuracy.png``: passkey accuracy vs compression ratio (one line per policy, one panel per
    length; KIVI as points at its byte saving). Returns the file name, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths) + 2.5, 4.8), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10").colors
    names = sorted({r["method"] for r in rows if r.get("ratio") is not None and r["method"] != "full"})
    for ax, T in zip(axes[0], lengths):
        full = [r for r in rows if r["T"] == T and r["method"] == "full" and r.get("accuracy") is not None]
        for i, name in enumerate(names):
            rs = sorted(
                (r for r in rows if r["T"] == T and r["method"] == name and r.get("accuracy") is not None),
                key=lambda r: r["ratio"],
            )
            pts = [(0.0, full[0]["accuracy"])] if full else []
            pts += [(r["ratio"], r["accuracy"]) for r in rs]
            dy = JITTER * (i - (len(names) - 1) / 2)  # lines with equal accuracy stay visible
            ax.plot(
                [p[0] for p in pts],
                [p[1] + dy for p in pts],
                linestyle=("-", "--", ":", "-.")[i % 4],
                marker="os^Dv<>ph"[i % 9],
                color=colors[i % 10],
                label=name,
                linewidth=1.2,
                markersize=5,
            )
        for j, r in enumerate(r for r in rows if r["T"] == T and r["method"].startswith("kivi")):
            if r.get("accuracy") is not None and r.get("cache_frac") is not None:
                ax.scatter(
                    [1 - r["cache_frac"]],
                    [r["accuracy"]],
                    marker="*x"[j % 2],
                    s=80,
                    color="black",
                    label=f"{r['method']} (x = bytes saved)",
                    zorder=5,
                )
        ax.set_title(f"context {T}", fontsize=10)
        ax.set_xlabel("compression ratio (fraction of the context removed)")
        ax.set_xlim(-0.03, 1.0)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("passkey accuracy (all digits right)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(
        f"effattn bench kv: passkey retrieval vs KV compression (lines offset by {JITTER} per policy for "
        f"visibility)\n{_plot_label(machine)}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(out / "kv_accuracy.png", dpi=110)
    plt.close(fig)
    return "kv_accuracy.png"


# the terminal summary (the report files hold every column)
TERMINAL_COLUMNS = (
    Column("T", key_column=True),
    Column("method", text=True, min_width=12, key_column=True),
    Column("ratio", key_column=True),
    Column("accuracy", "acc"),
    Column("digit_acc", "digit acc"),
    Column("cache_bytes", "cache B"),
    Column("cache_frac", "cache frac"),
    Column("mass_kept", "mass kept"),
    Column("needle_kept", "needle"),
    Column("prefill_s", "prefill s"),
    Column("tok_per_s", "tok/s"),
    Column("error", text=True),
)


def _progress(r: dict) -> None:
    """One readable line per row while the suite runs (the table comes at the end)."""
    parts = [f"{c.title} {format_value(r[c.key])}" for c in TERMINAL_COLUMNS[2:-1] if r.get(c.key) is not None]
    print(f"T={r['T']} {r['method']}: " + (r.get("error") or ", ".join(parts)), flush=True)
