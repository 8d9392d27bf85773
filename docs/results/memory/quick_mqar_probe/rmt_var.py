"""probe.py with RecurrentMemoryLM's start memory and write embedding drawn at std 0.02 (RMS 1/sqrt(dim) at
f252dae; std 0.02 the default since acbe169), for the runs of rmt_stack.txt before acbe169:

    PROBE=docs/results/memory/quick_mqar_probe/probe.py python docs/results/memory/quick_mqar_probe/rmt_var.py SPEC...
"""

import os
import runpy
import sys

import torch

from effattn.nn import RecurrentMemoryLM

_init = RecurrentMemoryLM.__init__


def _small_init(self, config, **kw):
    _init(self, config, **kw)
    with torch.no_grad():  # randn / sqrt(dim) -> randn * 0.02 (the same draws, rescaled)
        self.memory_init.mul_(0.02 * config.dim**0.5)
        self.write_pos.mul_(0.02 * config.dim**0.5)


RecurrentMemoryLM.__init__ = _small_init
sys.argv = [os.environ["PROBE"]] + sys.argv[1:]
runpy.run_path(os.environ["PROBE"], run_name="__main__")
