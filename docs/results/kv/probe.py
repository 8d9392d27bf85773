"""Why TOVA and K-norm fail on passkey, and where PyramidKV/CAKE put their budget (docs/kv.md, Benchmark).

Run from the repository root after ``python -m effattn bench kv`` has cached the model::

    OMP_NUM_THREADS=1 python docs/results/kv/probe.py > docs/results/kv/probe.txt

Uses the benchmark's model (default ``PasskeyModelConfig``, loaded from ``~/.cache/effattn`` or
trained) and its 16 prompts at 2048 tokens (``prompts_at(2048, 16, cfg, seed=0)``). Needle token
``0`` is ``KEY``, ``1..5`` the digits (digit ``j`` names its place ``j - 1``).
"""

from __future__ import annotations

import torch

from effattn.bench import kv as kb
from effattn.kv import make_policy

torch.set_num_threads(1)
T, N, RATIO = 2048, 16, 0.25
cfg = kb.PasskeyModelConfig()
model, info = kb.load_or_train(cfg, kb.default_cache_dir())
batch = kb.prompts_at(T, N, cfg, 0)
npos = batch.needle_pos
rows = torch.arange(N)
needle = npos[:, None] + torch.arange(6)  # [N, 6]
print(f"model {info['path']}; {N} prompts of {T} tokens; ratio {RATIO} (keep {int(T * (1 - RATIO))} per head)\n")

print("== TOVA: attention of the QUERY token (mean over the layer's heads) on the needle tokens ==")
probs = kb.reference_probs(model, batch.prompts)  # per layer [N, H, T]
keep = int(T * (1 - RATIO))
for layer, p in enumerate(probs):
    a = p.mean(1)  # [N, T]
    thr = a.topk(keep, dim=1).values[:, -1:]  # TOVA's keep threshold after the prefill
    on = a[rows[:, None], needle]  # [N, 6]
    print(
        f"layer {layer}: mean attention {[round(float(x), 4) for x in on.mean(0)]}; "
        f"share of prompts where the token is kept {[round(float(x), 2) for x in (on >= thr).float().mean(0)]}"
    )


def decode(policy, steps=5):
    state = model.compressed_state(policy)
    with torch.no_grad():
        logits, state = model(batch.prompts, state)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            logits, state = model(out[-1][:, None], state)
            out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, 1), state[0].cache


def needle_kept(cache, layer, head):
    pos = cache.positions(layer)[:, head]  # [N, n]
    return (pos[:, None, :] == needle[:, :, None]).any(-1).float().mean(0)  # [6]


for name in ("tova", "knorm"):
    pred, cache = decode(make_policy(name, ratio=RATIO))
    right = (pred == batch.keys).float().mean(0)
    right = [round(float(x), 2) for x in right]
    print(f"\n== {name} at ratio {RATIO}: share of prompts with each digit place right {right}")
    for layer in range(cfg.layers):
        for h in range(cfg.heads):
            print(
                f"  layer {layer} head {h}: share of prompts keeping each needle token after decoding "
                f"{[round(float(x), 2) for x in needle_kept(cache, layer, h)]}"
            )

print("\n== K-norm: rank of the needle keys' L2 norm (share of the context's keys with a smaller norm) ==")
full = model.cache_state("contiguous")
with torch.no_grad():
    model(batch.prompts, full)
for layer in range(cfg.layers):
    norms = full[layer].k.float().norm(dim=-1)  # [N, T, H]
    for h in range(cfg.heads):
        nh = norms[..., h]
        rank = (nh[:, None, :] < nh[rows[:, None], needle][..., None]).float().mean(-1)  # [N, 6]
        share = probs[layer][:, h][rows[:, None], needle].sum(1).mean()
        print(
            f"  layer {layer} head {h}: needle norm rank {[round(float(x), 3) for x in rank.mean(0)]}; "
            f"QUERY attention on the needle {float(share):.3f}"
        )

print("\n== PyramidKV / CAKE: tokens kept per (layer, kv head) after the prefill ==")
for name in ("pyramidkv", "cake"):
    for r in (0.25, 0.5, 0.75, 0.9):
        state = model.compressed_state(make_policy(name, ratio=r))
        with torch.no_grad():
            model(batch.prompts, state)
        print(f"  {name} ratio {r}: {[state[0].cache.budgets(layer) for layer in range(cfg.layers)]}")
