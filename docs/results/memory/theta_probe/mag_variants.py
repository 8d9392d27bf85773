"""Titans MAG's attention path on the quick MQAR preset's task (T=16, 4 pairs, vocabulary 32, width 64, 2
heads, lr 1e-3, seed 0, early stop at 0.99), with the memory's gate removed, for a budget of STEPS steps:

    STEPS=1000 python docs/results/memory/theta_probe/mag_variants.py "mag_nogate:{'chunk_size': 4}" \\
        "sliding_window:{'window': 16}" "titans_mag:{'chunk_size': 4}"

``mag_nogate``: ``y = W_out(SW-Attn(x))`` (MAG without ``sigmoid(m)``); ``mag_half_gate``: the gate fixed at 0.5.
Runs at commits before d969faf, whose MAG has the projection ``W_out`` (``../mag_mac_probe/`` says why it went).
Prints one line per run: the mixer and options, accuracy, final loss, steps run, seconds.
"""

import ast
import os
import sys

import torch

from effattn.bench.train import train_mqar
from effattn.nn.mixers.titans import TitansMAG
from effattn.nn.registry import register_mixer


@register_mixer("mag_nogate")
class MagNoGate(TitansMAG):
    def _layer(self, x, ms, cache, prefix, valid):
        a, cache = self.attn(x, cache, valid, prefix)
        return self.out(a), (ms, cache, prefix)


@register_mixer("mag_half_gate")
class MagHalfGate(TitansMAG):
    def _layer(self, x, ms, cache, prefix, valid):
        a, cache = self.attn(x, cache, valid, prefix)
        return self.out(a * 0.5), (ms, cache, prefix)


def main(specs: list[str]) -> None:
    torch.set_num_threads(1)
    steps = int(os.environ.get("STEPS", "400"))
    for spec in specs:
        mixer, _, options = spec.partition(":")
        r = train_mqar(
            mixer,
            64,
            heads=2,
            vocab_size=32,
            seq_len=16,
            num_kv_pairs=4,
            num_train=4000,
            num_test=256,
            steps=steps,
            batch_size=32,
            lr=1e-3,
            weight_decay=0.0,
            random_non_queries=False,
            seed=0,
            mixer_kw=ast.literal_eval(options) if options else {},
            early_stop=0.99,
        )
        summary = f"acc {r['accuracy']:.3f} loss {r['final_loss']:.3f} steps {r['steps_run']} s {r['train_s']:.0f}"
        print(spec, summary, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
