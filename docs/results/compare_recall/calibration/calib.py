"""Scratch calibration of the recall preset: train a 2-layer LM on an MQAR mixture, print accuracy
per pair count every 150 steps (see COMMANDS.md for the runs made with it).

python calib.py MIXER WIDTH LR STEPS T VOCAB BATCH PAIRS [RANDOM_NON_QUERIES=0] [EXAMPLES_PER_COUNT=3000]
    [HEAD_DIM=32]
"""

import sys
import time

import torch
import torch.nn.functional as F

from effattn.bench.tasks.mqar import make_mqar
from effattn.bench.train import _batcher, _logits, _lr_at, build_lm, mqar_accuracy

torch.set_num_threads(1)
mixer, d, lr, steps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
T, V, B = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
pairs = [int(p) for p in sys.argv[8].split(",")]
rnq = bool(int(sys.argv[9])) if len(sys.argv) > 9 else False
per_count = int(sys.argv[10]) if len(sys.argv) > 10 else 3000
head_dim = int(sys.argv[11]) if len(sys.argv) > 11 else 32

torch.manual_seed(0)
lm = build_lm(mixer, d, max(1, d // head_dim), V)
xs, ys = zip(*[make_mqar(per_count, T, p, V, seed=i, random_non_queries=rnq) for i, p in enumerate(pairs)])
x, y = torch.cat(xs), torch.cat(ys)
tests = {p: make_mqar(256, T, p, V, seed=10000 + p, random_non_queries=rnq) for p in pairs}
opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
batches = _batcher(x, y, B, 0, "cpu")
t0 = time.perf_counter()
for s in range(steps):
    for g in opt.param_groups:
        g["lr"] = _lr_at(s, steps, lr)
    xb, yb = batches(s)
    logits = _logits(lm, xb)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    if (s + 1) % 150 == 0 or s + 1 == steps:
        accs = {p: round(mqar_accuracy(lm, *tests[p], 256), 3) for p in pairs}
        print(mixer, d, lr, s + 1, f"{time.perf_counter() - t0:.0f}s", f"loss {loss.item():.3f}", accs, flush=True)
