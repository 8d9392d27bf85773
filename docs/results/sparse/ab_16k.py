"""A/B of one row at T=16k against SDPA causal, forward+backward, 3 back-to-back pairs (the median of
time(SDPA) / time(row)); the effattn tree comes from PYTHONPATH. Usage (old tree in a worktree):
`git worktree add /tmp/old 1cade05; PYTHONPATH=/tmp/old/src python docs/results/sparse/ab_16k.py routing`."""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import effattn
from effattn.exact import attention
from effattn.sparse import REGISTRY

name, T, reps = sys.argv[1], 16384, 3
B, H, D = 1, 4, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_(True) for _ in range(3))
sq, sk, sv = (torch.randn(B, H, T, D, generator=g).requires_grad_(True) for _ in range(3))
if name == "tiled_causal":

    def fwd():
        return attention(q, k, v, causal=True, backend="tiled")
else:
    m = REGISTRY[name]
    p = m.make_params(T)
    c = True in m.causal_modes

    def fwd():
        return m.attend(q, k, v, causal=c, **p)


def fb(f, leaves):
    def run():
        o = f()
        o.backward(torch.ones_like(o))
        for x in leaves:
            x.grad = None

    return run


a, b = fb(lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=True), [sq, sk, sv]), fb(fwd, [q, k, v])
a()
b()
ratios = []
for _ in range(reps):
    t0 = time.perf_counter()
    a()
    t1 = time.perf_counter()
    b()
    t2 = time.perf_counter()
    ratios.append((t1 - t0) / (t2 - t1))
print(
    f"{effattn.__file__.split('/src/')[0]} {name} x_sdpa={statistics.median(ratios):.3f}",
    f"pairs={[round(r, 3) for r in ratios]}",
    flush=True,
)
