"""Probes on the quick MQAR preset's task (T=16, 4 pairs, vocabulary 32, width 64, 2 heads, lr 1e-3, seed SEED,
early stop at 0.99, STEPS steps): a mixer and its options per argument, ``MIXER:{options}``, or for the RMT
whose memory tokens pass through the whole stack (:class:`effattn.nn.RecurrentMemoryLM`)
``MIXER:{options}:{recurrent_memory options}``. Infini-attention at its defaults beside variants that say where
it fails (``infini.txt``), and the two RMT forms (``rmt_stack.txt``)::

    STEPS=400 python docs/results/memory/quick_mqar_probe/probe.py "infini_attention:{}" \\
        "infini_attention:{'segment': 16}" "infini_qk_conv:{}" "infini_memory_only:{}"
    python docs/results/memory/quick_mqar_probe/probe.py "rmt:{}" "attention:{}:{'num_memory': 4, 'segment': 8}"

``PRESET=state HEAD_DIM=8 LR=0.001`` trains on another preset's task instead (``rmt_stack_state.txt``).

``infini_qk_conv``: short causal convolutions (``ShortConv``, kernel 4, SiLU, as DeltaNet's) on q and k after
their projections (the memory's keys then hold the token before: the binding MQAR needs; ``memory_only=True``
as below); ``infini_memory_only``:
the gate fixed so the output is the memory read alone (``A_mem``), the local attention off.
Prints one line per run: the mixer and options, accuracy, final loss, steps run, seconds.
"""

import ast
import os
import sys

import torch

from effattn.bench.compare.config import make_config
from effattn.bench.compare.sweep import RecallRun, train_kwargs
from effattn.bench.train import train_mqar
from effattn.memory import infini_attention
from effattn.nn.mixers._base import ShortConv, check_x_and_valid, zero_invalid
from effattn.nn.mixers.infini_attention import InfiniAttentionMixer
from effattn.nn.registry import register_mixer


@register_mixer("infini_qk_conv")
class InfiniQKConv(InfiniAttentionMixer):
    def __init__(self, dim, heads, memory_only=False, **kw):
        super().__init__(dim, heads, **kw)
        self.q_conv, self.k_conv = ShortConv(dim), ShortConv(dim)
        if memory_only:
            _memory_only(self)

    def forward(self, x, state=None, valid=None):  # whole sequences only (training)
        valid = check_x_and_valid(x, self.dim, valid)
        B, T, H, D = x.shape[0], x.shape[1], self.heads, self.head_dim
        x = zero_invalid(x, valid)
        q = self.q_conv(self.q_proj(x))[0].view(B, T, H, D)
        k = self.k_conv(self.k_proj(x))[0].view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        o, _ = infini_attention(q, k, v, self.gate, segment=self.segment, delta=self.delta, rope=self.rope)
        return self.o_proj(o.reshape(B, T, -1)), None


def _memory_only(mixer):
    mixer.gate.requires_grad_(False)
    mixer.gate.fill_(30.0)  # sigmoid(30) = 1 - 9e-14: the output is A_mem


@register_mixer("infini_memory_only")
class InfiniMemoryOnly(InfiniAttentionMixer):
    def __init__(self, dim, heads, **kw):
        super().__init__(dim, heads, **kw)
        _memory_only(self)


def main(specs: list[str]) -> None:
    torch.set_num_threads(1)
    steps, seed = int(os.environ.get("STEPS", "400")), int(os.environ.get("SEED", "0"))
    for spec in specs:
        mixer, _, options = spec.partition(":")
        options, _, rmt = options.partition("}:")
        options += "}" if rmt else ""
        # the preset's task and early stop (PRESET, default quick), at LR (default the preset's lr) and HEAD_DIM
        cfg = make_config(os.environ.get("PRESET", "quick"), mqar_steps=steps)
        head_dim = int(os.environ.get("HEAD_DIM", cfg.mqar_head_dims[0]))
        lr = float(os.environ.get("LR", cfg.mqar_lr))
        kwargs = train_kwargs(cfg, RecallRun(mixer, cfg.mqar_widths[0], head_dim, lr, seed))
        kwargs.update(mixer_kw=ast.literal_eval(options) if options else {})
        r = train_mqar(mixer, cfg.mqar_widths[0], recurrent_memory=ast.literal_eval(rmt) if rmt else None, **kwargs)
        summary = f"acc {r['accuracy']:.3f} loss {r['final_loss']:.3f} steps {r['steps_run']} s {r['train_s']:.0f}"
        by_pairs = r["accuracy_by_pairs"]
        per_count = " by pairs " + " / ".join(f"{a:.2f}" for a in by_pairs.values()) if len(by_pairs) > 1 else ""
        print(spec, f"seed {seed}", summary + per_count, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
