"""One MQAR training at the state preset's task (T=32, a mixture of 2/4/8 pairs, vocabulary 34, width 64,
head dim 8, lr 1e-3, seed 0, early stop at 0.99) for a quick probe of a mixer and its options:

    python docs/results/memory/arch_check/diag.py MIXER "{'chunk_size': 8, 'theta_max': 1.0}" [STEPS]

Prints the mixer, the options, accuracy, final loss, steps run, seconds and the accuracy per pair count.
"""

import ast
import sys

import torch

from effattn.bench.train import train_mqar


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mixer, options = argv[0], ast.literal_eval(argv[1]) if len(argv) > 1 else {}
    steps = int(argv[2]) if len(argv) > 2 else 600
    r = train_mqar(
        mixer,
        64,
        heads=8,
        vocab_size=34,
        seq_len=32,
        num_kv_pairs=[2, 4, 8],
        num_train=24000,
        num_test=256,
        steps=steps,
        batch_size=32,
        lr=1e-3,
        weight_decay=0.0,
        random_non_queries=False,
        seed=0,
        mixer_kw=options,
        early_stop=0.99,
    )
    summary = f"acc {r['accuracy']:.3f} loss {r['final_loss']:.3f} steps {r['steps_run']} s {r['train_s']:.0f}"
    print(mixer, options, summary, r.get("accuracy_by_pairs"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
