"""Attention after 600 steps on the state-preset cell of rmt_prefix.py: ``python rmt_prefix_attention.py plain``
(the attention LM; position 0 holds the first key) or ``... mem`` (RecurrentMemoryLM, one learned read token in
front, segment 64 > T): per layer and head, the attention mass on position 0 and on the previous token, averaged
over the real tokens' queries of 64 held-out 8-pair sequences."""

import os
import sys

import torch

import effattn.bench.train as tr
from effattn.bench.compare.config import make_config
from effattn.bench.compare.sweep import RecallRun, train_kwargs
from effattn.bench.tasks.mqar import make_mqar

torch.set_num_threads(1)
cfg = make_config("state", mqar_steps=int(os.environ.get("STEPS", "600")))
kw = train_kwargs(cfg, RecallRun("attention", 64, 8, 1e-3, 0))
captured = {}
orig_build = tr.build_lm


def build(*a, **k):
    model = orig_build(*a, **k)
    captured["model"] = model
    return model


tr.build_lm = build
rm = None if sys.argv[1] == "plain" else dict(num_memory=1, segment=64)
r = tr.train_mqar("attention", 64, recurrent_memory=rm, **kw)
model = captured["model"].eval()
qk = []


def capture(att):
    orig = att._project

    def proj(x, pos, rotate=True):
        q, k, v = orig(x, pos, rotate)
        qk.append((q, k))
        return q, k, v

    att._project = proj


for blk in model.blocks:
    capture(blk.mixer)
x, _ = make_mqar(64, 32, 8, 34, seed=123)
with torch.no_grad():
    model(x)
off = 0 if rm is None else 1
print(sys.argv[1], f"acc {r['accuracy']:.3f}")
for layer, (q, k) in enumerate(qk):
    s = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    T = s.shape[-1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)[..., off:, :]  # the real tokens' queries
    first = p[..., 0].mean((0, 2))  # per head: mass on position 0
    prev = torch.stack([p[:, :, i, off + i - 1] for i in range(1, T - off)], -1).mean((0, 2))
    print(
        f" layer {layer}: mass on position 0 per head",
        " ".join(f"{v:.2f}" for v in first.tolist()),
        "| on the previous token",
        " ".join(f"{v:.2f}" for v in prev.tolist()),
    )
