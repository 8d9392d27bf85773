"""TransMLA on a model of ours: train a small GQA byte-level LM on effattn.data.byte_corpus, compress
every attention layer with effattn.nn.transmla_from_gqa (RoRoPE + joint K/V PCA) at several ranks,
and report validation loss, the layer-0 output error and the KV-cache numbers per token.

    python examples/transmla_rank.py --steps 400 --out docs/results/transmla

No fine-tuning after the conversion (the paper fine-tunes; this measures the conversion alone).
Calibration: inputs of each attention layer of the trained GQA model on training windows (every
layer is fitted on the unconverted model's activations).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from effattn.data import byte_corpus, sample_windows
from effattn.nn import LM, LMConfig, transmla_from_gqa, transmla_latent_width


def bits_per_byte(model: LM, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits, _ = model(x)
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) / math.log(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/transmla")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()
    cfg = LMConfig(vocab_size=256, dim=128, heads=4, kv_heads=2, n_layers=2, mixers="attention")
    model = LM(cfg)
    train, val = byte_corpus("train", max_bytes=4_000_000), byte_corpus("validation", max_bytes=400_000)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    for step in range(args.steps):
        x, y = sample_windows(train, args.batch, args.seq, gen)
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()
    vx, vy = sample_windows(val, 32, 256, torch.Generator().manual_seed(1))
    cx, _ = sample_windows(train, 16, 256, torch.Generator().manual_seed(2))
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        b.mixer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i, b in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(cx)
        calib = dict(inputs)
        model(vx)
        val_in = dict(inputs)
    for h in hooks:
        h.remove()
    base = bits_per_byte(model, vx, vy)
    attn0 = model.blocks[0].mixer
    G, hd, rot = attn0.kv_heads, attn0.head_dim, attn0.rope.rot_dim
    with torch.no_grad():
        ref0 = attn0(val_in[0])[0]
    rows = [dict(rope_heads="-", rank="GQA", cache_numbers=2 * G * hd, val_bpb=base, layer0_rel_err=0.0)]
    for m in (0, 1, G):
        W = transmla_latent_width(attn0, m)
        for r in sorted({8, 16, 32, 48, 64, W} & set(range(1, W + 1))):
            conv = copy.deepcopy(model)
            with torch.no_grad():
                for i, b in enumerate(conv.blocks):
                    b.mixer = transmla_from_gqa(model.blocks[i].mixer, calib[i], rank=r, rope_heads=m)
                y0 = conv.blocks[0].mixer(val_in[0])[0]
            err = float((y0 - ref0).norm() / ref0.norm())
            rows.append(
                dict(
                    rope_heads=m,
                    rank=r,
                    cache_numbers=r + m * rot,
                    val_bpb=bits_per_byte(conv, vx, vy),
                    layer0_rel_err=err,
                )
            )
            print(rows[-1], flush=True)
    load1 = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command=f"python examples/transmla_rank.py --steps {args.steps} --seq {args.seq} "
        f"--batch {args.batch} --seed {args.seed}",
        model=dict(dim=128, heads=4, kv_heads=G, head_dim=hd, n_layers=2, params=model.num_parameters()),
        train_seconds=round(train_s, 1),
        loadavg_before=load0,
        loadavg_after=load1,
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
        validation="32 windows x 256 bytes (seed 1); calibration 16 x 256 training bytes (seed 2)",
    )
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        "# TransMLA: cache vs quality on a trained byte-level GQA LM",
        "",
        f"Command: `{meta['command']}`; one run, one seed; trained {train_s:.0f} s on a busy shared 2-core CPU "
        f"(load average before {load0[0]:.1f}, after {load1[0]:.1f}); no fine-tuning after conversion.",
        f"Model: 2 layers, dim 128, 4 query heads, {G} kv heads of {hd} (RoPE on {rot} channels).",
        "",
        "| RoPE components kept | rank r | cache numbers / token / layer | val bits/byte | layer-0 rel. error |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rope_heads']} | {r['rank']} | {r['cache_numbers']} | {r['val_bpb']:.4f} | {r['layer0_rel_err']:.2e} |"
        for r in rows
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m in (0, 1, G):
            rs = [r for r in rows if r["rope_heads"] == m]
            axes[0].plot([r["cache_numbers"] for r in rs], [r["val_bpb"] for r in rs], "o-", label=f"RoPE comps {m}")
            axes[1].semilogy(
                [r["cache_numbers"] for r in rs],
                [max(r["layer0_rel_err"], 1e-8) for r in rs],
                "o-",
                label=f"RoPE comps {m}",
            )
        axes[0].axhline(base, color="k", ls="--", label=f"GQA ({2 * G * hd} numbers)")
        axes[0].set(xlabel="cache numbers per token per layer", ylabel="validation bits/byte", title="loss vs cache")
        axes[1].set(
            xlabel="cache numbers per token per layer", ylabel="layer-0 relative error", title="output error vs cache"
        )
        for a in axes:
            a.legend()
            a.grid(alpha=0.3)
        fig.suptitle("TransMLA conversion of a trained 2-layer GQA byte LM (busy CPU, one seed, no fine-tuning)")
        fig.tight_layout()
        fig.savefig(out / "error_vs_rank.png", dpi=100)
    except ImportError:
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
