"""Titans MAG without its second output projection and MAC with RMS-normalised retrievals, as variants of the
mixers at c1fd49f (MAG then ``y = W_out(a * sigmoid(m))``, MAC ``h_t = m_t``), on the quick MQAR preset's task
through ``theta_probe/mag_variants.py`` (T=16, 4 pairs, width 64, 2 heads, lr 1e-3, seed 0, early stop 0.99):

    PYTHONPATH=src python docs/results/memory/mag_mac_probe/probe.py "mag_nogate_noout:{'chunk_size': 4}" \\
        "mag_noout:{'chunk_size': 4}" "mag_nogate:{'chunk_size': 4}" "mac_hnorm:{'chunk_size': 4}" \\
        "titans_mac:{'chunk_size': 4}"

Runs at c1fd49f only (``mag_nogate`` needs MAG's ``out``; since d969faf ``mag_noout`` and ``mac_hnorm`` are
the mixers' defaults). ``mag_noout``: ``y = a * sigmoid(m)``; ``mag_nogate_noout``: ``y = a``; ``mac_hnorm``:
``h_t = RMSNorm(m_t)`` before the segment attention's key/value projections.
"""

import importlib.util
import pathlib
import sys

import torch
import torch.nn.functional as F

from effattn.nn.mixers._base import check_x_and_valid
from effattn.nn.mixers.titans import TitansMAC, TitansMAG
from effattn.nn.registry import register_mixer

_path = pathlib.Path(__file__).resolve().parent.parent / "theta_probe" / "mag_variants.py"
_spec = importlib.util.spec_from_file_location("mag_variants", _path)
mag_variants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mag_variants)  # registers mag_nogate, mag_half_gate


@register_mixer("mag_noout")
class MagNoOut(TitansMAG):
    def _layer(self, x, ms, cache, prefix, valid):
        m, ms = self.memory(x, ms, valid)
        a, cache = self.attn(x, cache, valid, prefix)
        return a * torch.sigmoid(m), (ms, cache, prefix)


@register_mixer("mag_nogate_noout")
class MagNoGateNoOut(TitansMAG):
    def _layer(self, x, ms, cache, prefix, valid):
        a, cache = self.attn(x, cache, valid, prefix)
        return a, (ms, cache, prefix)


@register_mixer("mac_hnorm")
class MacHNorm(TitansMAC):
    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        ms, ss = (None, None) if state is None else state
        m, ms = self.memory(x, ms, valid)
        o, ss = self._attend(x, F.rms_norm(m, (self.dim,)), ss, valid)
        return self.o_proj(o), (ms, ss)


if __name__ == "__main__":
    mag_variants.main(sys.argv[1:])
