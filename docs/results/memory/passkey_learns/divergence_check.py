"""Does a neural memory with little forgetting stay finite over a long passkey prompt when its gates are high?

The passkey models of this folder (theta_max 1.0, forgetting-gate bias -6) score 0.00 (below chance) at 2048
tokens. This check builds the same untrained Titans MAL / ATLAS models, pushes the step-size and momentum gates
high (theta = 0.95 theta_max, eta = 0.88, the forgetting gate left at its initial bias) and reports where the
logits of a 2048-token prompt first stop being finite: several theta_max, the memories' default gates
(theta_max 0.1, bias -3), the token-by-token rule (chunk 1) and the chunked form (chunk 16), and with the
per-token gradient clipping the memories gained after this check (``max_grad_norm``, the last column).
Run: python docs/results/memory/passkey_learns/divergence_check.py (about a minute).
"""

import argparse

import torch

from effattn.bench.memory import add_arguments, build_model
from effattn.bench.tasks.passkey import make_passkey
from effattn.memory import NeuralMemory

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
add_arguments(parser)
x = make_passkey(2, 2048, 4, seed=1).inputs
for name, theta_max, forget, chunk, clip in [
    ("titans_mal", 1.0, -6, 1, None),
    ("titans_mal", 1.0, -6, 16, None),
    ("titans_mal", 0.25, -6, 16, None),
    ("titans_mal", 0.1, -3, 16, None),  # the memories' own defaults
    ("atlas", 1.0, -6, 16, None),
    ("atlas", 0.25, -6, 16, None),
    ("atlas", 0.1, -3, 16, None),
    ("titans_mal", 1.0, -6, 1, 1.0),
    ("titans_mal", 1.0, -6, 16, 1.0),
    ("titans_mal", 1.0, -6, 16, 4.0),
    ("atlas", 1.0, -6, 16, 1.0),
    ("atlas", 1.0, -6, 16, 4.0),
]:
    args = parser.parse_args(
        ["--window", "32", "--heads", "1", "--theta-max", str(theta_max), "--forget-bias", str(forget)]
        + ["--chunk-size", str(chunk)]
        + ([] if clip is None else ["--max-grad-norm", str(clip)])
    )
    torch.manual_seed(0)
    model = build_model(name, args, 2048).eval()
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            with torch.no_grad():
                b = m.gate_proj.bias.view(-1, m.heads)
                b[0].fill_(3.0)  # theta = theta_max * sigmoid(3) = 0.95 theta_max
                b[1].fill_(2.0)  # eta = sigmoid(2) = 0.88
    with torch.no_grad():
        logits = model(x)[0]
    finite = torch.isfinite(logits).all(-1)
    bad = (~finite).nonzero()
    first = int(bad[:, 1].min()) if len(bad) else None
    print(
        f"{name} theta_max={theta_max} forget_bias={forget} chunk={chunk} max_grad_norm={clip}: "
        f"finite positions {finite.float().mean():.2f}, first non-finite {first}, "
        f"largest |logit| {logits.nan_to_num(posinf=float('inf')).abs().max().item():.3g}"
    )
