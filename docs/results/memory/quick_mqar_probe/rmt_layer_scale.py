"""probe.py with the per-layer RMT mixer's start memory and write embedding drawn at unit RMS (the scale of the
normed layer inputs it sits beside) instead of RMS 1/sqrt(dim), for the last lines of rmt_stack.txt:

    PROBE=docs/results/memory/quick_mqar_probe/probe.py STEPS=2000 python \\
        docs/results/memory/quick_mqar_probe/rmt_layer_scale.py "rmt:{}"
"""

import os
import runpy
import sys

import torch

from effattn.memory import RecurrentMemoryAttention

_init = RecurrentMemoryAttention.__init__


def _unit_rms_init(self, dim, heads, **kw):
    _init(self, dim, heads, **kw)
    with torch.no_grad():  # randn / sqrt(dim) -> randn (the same draws, rescaled)
        self.memory_init.mul_(dim**0.5)
        self.write_pos.mul_(dim**0.5)


RecurrentMemoryAttention.__init__ = _unit_rms_init
sys.argv = [os.environ["PROBE"]] + sys.argv[1:]
runpy.run_path(os.environ["PROBE"], run_name="__main__")
