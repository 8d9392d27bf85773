"""Run: python docs/results/memory/mqar_state/nan_check.py none  (or 1: max_grad_norm=1); 5-12 min, one busy core.
Where does Titans MAL's MQAR training at lr 3e-3 turn NaN? Same data/model/loop as compare's state preset cell
(titans_mal, width 64, head dim 8, chunk 8, seed 0), stopping at the first non-finite loss or gradient."""

import sys
import time

import torch
import torch.nn.functional as F

from effattn.bench import train as T
from effattn.bench.tasks.mqar import IGNORE_INDEX

torch.set_num_threads(1)
clip = None if sys.argv[1] == "none" else float(sys.argv[1])
torch.manual_seed(0)
kw = dict(chunk_size=8) | ({} if clip is None else dict(max_grad_norm=clip))
model = T.build_lm("titans_mal", 64, 8, 34, 2, max_seq_len=64, mlp_ratio=4.0, **kw)
sets = [T.cached_mqar(8000, 32, p, 34, False, 0 + i) for i, p in enumerate((2, 4, 8))]
x = torch.cat([a for a, _ in sets])
y = torch.cat([b for _, b in sets])
batches = T._batcher(x, y, 32, 0, "cpu")
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
bad = {}


def hook(name):
    def f(m, i, o):
        t = o[0] if isinstance(o, tuple) else o
        if not torch.isfinite(t).all() and not bad:
            bad["first"] = name

    return f


for n, m in model.named_modules():
    if n.count(".") <= 3 and n:
        m.register_forward_hook(hook(n))
t0 = time.time()
for step in range(600):
    for g in opt.param_groups:
        g["lr"] = T.lr_at(step, 600, 3e-3)
    xb, yb = batches(step)
    out = model(xb)
    logits = out[0] if isinstance(out, tuple) else out
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1), ignore_index=IGNORE_INDEX)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not torch.isfinite(loss) or not torch.isfinite(gn):
        print(
            f"clip={clip} step {step}: loss {loss.item():.4g} grad norm {gn.item():.4g}; "
            f"first non-finite forward module: {bad.get('first')}"
        )
        break
    if step % 50 == 0:
        print(
            f"clip={clip} step {step} loss {loss.item():.3f} grad norm {gn.item():.3g} ({time.time() - t0:.0f} s)",
            flush=True,
        )
    opt.step()
else:
    print(f"clip={clip}: 600 steps finite, final loss {loss.item():.4f}")
