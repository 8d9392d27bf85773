"""RecurrentMemoryLM's start memory on one state-preset cell (T=32, 2/4/8 pairs, head dim 8, lr 1e-3, seed 0):
``python rmt_prefix.py VARIANT`` with VARIANT one of ``learned`` (the default: a learned Mem_0 drawn at std 0.02),
``zero_frozen`` (fixed at 0: what ``start_memory="zeros"`` does since 52891e3), ``frozen`` (drawn, not learned),
``zero`` (starts at 0, learned), ``unit`` (drawn at std 1, learned). Env: SEG (segment, default 64 > T: one
segment, the read tokens in front and no writes), M (memory tokens, default 1), STEPS (default 600)."""

import os
import sys

import torch

from effattn.bench.compare.config import make_config
from effattn.bench.compare.sweep import RecallRun, train_kwargs
from effattn.bench.train import train_mqar
from effattn.nn import RecurrentMemoryLM

variant = sys.argv[1]
steps = int(os.environ.get("STEPS", "600"))
seg, m = int(os.environ.get("SEG", "64")), int(os.environ.get("M", "1"))
orig = RecurrentMemoryLM.__init__


def init(self, config, **kw):
    orig(self, config, **kw)
    with torch.no_grad():
        if variant in ("zero_frozen", "zero"):
            self.memory_init.zero_()
        elif variant == "unit":
            self.memory_init.normal_(0, 1.0)
    if variant in ("zero_frozen", "frozen"):
        self.memory_init.requires_grad_(False)


RecurrentMemoryLM.__init__ = init
torch.set_num_threads(1)
cfg = make_config("state", mqar_steps=steps)
kw = train_kwargs(cfg, RecallRun("attention", 64, 8, 1e-3, 0))
r = train_mqar("attention", 64, recurrent_memory=dict(num_memory=m, segment=seg), **kw)
by_pairs = " / ".join(f"{a:.2f}" for a in r["accuracy_by_pairs"].values())
print(
    variant,
    f"seg {seg} m {m} steps {steps} acc {r['accuracy']:.3f} loss {r['final_loss']:.3f} steps_run {r['steps_run']}",
    by_pairs,
    flush=True,
)
