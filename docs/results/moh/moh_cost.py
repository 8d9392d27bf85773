"""MoH attention FLOPs and time vs MHA at equal heads (dim 256, 8 heads, T = 1024, batch 1, no grad).

Run: ``.venv/bin/python docs/results/moh/moh_cost.py`` (prints the table of docs/nn.md, MoH section).
"""

import statistics
import time

import torch

from effattn.nn import Attention
from effattn.nn.moh import MoHAttention, attention_flops


def median_time(layer) -> float:
    with torch.no_grad():
        layer(x)
        runs = []
        for _ in range(3):
            s = time.perf_counter()
            layer(x)
            runs.append(time.perf_counter() - s)
    return statistics.median(runs)


torch.manual_seed(0)
torch.set_num_threads(2)
x = torch.randn(1, 1024, 256)
mha = Attention(256, 8)
print("| layer | attention GFLOPs | s, selected | s, dense |")
mha_flops = attention_flops(torch.ones(1, 1024, 8), 32) / 1e9
print(f"| MHA, 8 heads | {mha_flops:.3f} | - | {median_time(mha):.3f} |")
for k in (6, 4, 2):
    m = MoHAttention(256, 8, shared_heads=2, top_k=k)
    d = MoHAttention(256, 8, shared_heads=2, top_k=k, compute="dense")
    d.load_state_dict(m.state_dict())
    with torch.no_grad():
        m(x)
    flops = attention_flops(m.last_gates, 32) / 1e9
    print(f"| MoH, 2 shared + top-{k} of 6 | {flops:.3f} | {median_time(m):.3f} | {median_time(d):.3f} |")
