"""Small training loops for the quality side of ``effattn compare``: MQAR and ListOps.

Each builds a 2-layer :class:`effattn.nn.LM` with the named mixer, trains it with AdamW on generated
data, and reports accuracy on a held-out set drawn with another seed, with the model's parameter
count and state size (:meth:`effattn.nn.LM.state_size`: the KV cache for attention, the recurrent
state for linear mixers). Zoology's recipe (Arora et al. 2023) in miniature: loss only at the query
positions, AdamW, a short linear warm-up of the learning rate.

Example::

    >>> r = train_mqar("attention", 32, heads=1, steps=2, num_train=64, num_test=16, batch_size=16)
    >>> sorted(r)[:3]
    ['accuracy', 'accuracy_by_pairs', 'final_loss']
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from effattn.bench.tasks.listops import NUM_CLASSES, PAD_ID, VOCAB_SIZE, make_listops
from effattn.bench.tasks.mqar import IGNORE_INDEX, make_mqar

# ListOps classes are read from output ids VOCAB_SIZE .. VOCAB_SIZE + 9 of the LM head: ids no input
# uses, so a head tied to the embeddings keeps class rows separate from the token rows.
LISTOPS_CLASS_OFFSET = VOCAB_SIZE


def build_lm(
    mixer: str,
    dim: int,
    heads: int,
    vocab_size: int,
    layers: int = 2,
    max_seq_len: int = 4096,
    mlp_ratio: float = 4.0,
    recurrent_memory: dict | None = None,
    **mixer_kw,
):
    """A ``layers``-layer :class:`effattn.nn.LM` whose every block uses mixer ``mixer``; with
    ``recurrent_memory`` (keyword arguments: ``num_memory``, ``segment``, ``bptt_segments``) an
    :class:`effattn.nn.RecurrentMemoryLM`, the LM run segment by segment with memory tokens."""
    from effattn.nn import LM, LMConfig, RecurrentMemoryLM

    config = LMConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=layers,
        heads=heads,
        mixers=mixer,
        max_seq_len=max_seq_len,
        mlp_ratio=mlp_ratio,
        mixer_kwargs={mixer: mixer_kw} if mixer_kw else {},
    )
    return LM(config) if recurrent_memory is None else RecurrentMemoryLM(config, **recurrent_memory)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, tuple):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    return out


def lr_at(step: int, steps: int, lr: float) -> float:
    """Learning rate at ``step`` of ``steps``: linear warm-up over the first 5% of the steps, constant
    after it, linear decay in the last 10%.

    Example::

        >>> [round(lr_at(s, 100, 1.0), 2) for s in (0, 4, 50, 95, 99)]
        [0.2, 1.0, 1.0, 0.5, 0.1]
    """
    warm, cool = max(1, steps // 20), max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * min(1.0, (steps - step) / cool)


class EarlyStop:
    """Stop a training once its accuracy on the training batches, pooled over the last ``window`` steps,
    is at least ``threshold`` (it has held there, not touched it once). A run below the threshold is
    never stopped: it trains its whole budget.

    Example::

        >>> stop = EarlyStop(0.99, window=2)
        >>> [stop.update(h, 100) for h in (100, 97, 100, 100)]
        [False, False, False, True]
    """

    def __init__(self, threshold: float = 0.99, window: int = 20) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self.threshold, self.window = threshold, window
        self.history: list[tuple[int, int]] = []

    def update(self, hits: int, total: int) -> bool:
        """Record one step's correct and counted positions; ``True`` when the run may stop."""
        self.history.append((hits, total))
        last = self.history[-self.window :]
        if len(last) < self.window:
            return False
        counted = sum(t for _, t in last)
        return counted > 0 and sum(h for h, _ in last) >= self.threshold * counted

    @property
    def held(self) -> float | None:
        """Accuracy pooled over the last ``window`` steps (``None`` before the first step)."""
        last = self.history[-self.window :]
        counted = sum(t for _, t in last)
        return sum(h for h, _ in last) / counted if counted else None


def _train(
    model, batches, loss_fn, steps: int, lr: float, weight_decay: float, stop: Callable[[], bool] | None = None
) -> tuple[float, int]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x, y = batches(step)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if stop is not None and stop():
            return float(loss.detach()), step + 1
    return float(loss.detach()), steps


def _batcher(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    perm = torch.randperm(n, generator=g)
    per_epoch = max(1, n // batch_size)

    def batches(step: int):
        nonlocal perm
        i = step % per_epoch
        if i == 0 and step:
            perm = torch.randperm(n, generator=g)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        return x[idx].to(device), y[idx].to(device)

    return batches


@functools.lru_cache(maxsize=8)
def cached_mqar(
    num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, random_non_queries: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`effattn.bench.tasks.mqar.make_mqar` (MQAR, Zoology: Arora et al. 2023) remembered per arguments in
    this process (the last 8 sets).

    The trainings of a sweep cell at its learning rates share their seed's data: generating 24000 examples
    takes about 5 s, a quarter of a quiet 600-step attention training. The tensors must only be read
    (:func:`train_mqar` takes batches by index, which copies, and test slices, which it does not write).

    Example::

        >>> x, y = cached_mqar(4, 16, 2, 32, False, 0)
        >>> cached_mqar(4, 16, 2, 32, False, 0)[0] is x, tuple(x.shape)
        (True, (4, 16))
    """
    return make_mqar(
        num_examples,
        input_seq_len=seq_len,
        num_kv_pairs=num_kv_pairs,
        vocab_size=vocab_size,
        random_non_queries=random_non_queries,
        seed=seed,
    )


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_mqar(
    mixer: str,
    dim: int,
    *,
    heads: int = 1,
    layers: int = 2,
    mlp_ratio: float = 4.0,
    vocab_size: int = 64,
    seq_len: int = 32,
    num_kv_pairs: int | Sequence[int] = 4,
    num_train: int = 2000,
    num_test: int = 256,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    random_non_queries: bool = True,
    seed: int = 0,
    device: str = "cpu",
    mixer_kw: dict | None = None,
    early_stop: float | None = None,
    early_stop_window: int = 20,
    recurrent_memory: dict | None = None,
) -> dict:
    """Train a ``layers``-layer LM with mixer ``mixer`` at width ``dim`` on MQAR (with ``recurrent_memory``,
    a :class:`effattn.nn.RecurrentMemoryLM` of those options: :func:`build_lm`).

    ``num_kv_pairs`` is one pair count, or several: then, as in Zoology, the model trains on a
    mixture (``num_train`` examples split evenly over the pair counts, all at ``seq_len``, shuffled
    together) and is tested on ``num_test`` held-out examples of each pair count.

    Returns ``accuracy`` (fraction of held-out query positions whose argmax is the paired value;
    with several pair counts, the mean of the per-count accuracies), ``accuracy_by_pairs``
    (``{pairs: accuracy}``), ``state_bytes`` (``LM.state_size(seq_len, batch=1)``), ``params``,
    ``final_loss``, ``train_s``, ``steps`` (the budget) and ``steps_run``. With ``early_stop`` (e.g. 0.99)
    training ends once the accuracy at the query positions of the training batches, pooled over the
    last ``early_stop_window`` steps, is at least ``early_stop`` (:class:`EarlyStop`); until it stops,
    the run is the same as without it.
    """
    pair_counts = [num_kv_pairs] if isinstance(num_kv_pairs, int) else list(num_kv_pairs)
    if not pair_counts or len(set(pair_counts)) != len(pair_counts):
        raise ValueError(f"num_kv_pairs must be an int or distinct ints, got {num_kv_pairs!r}")
    torch.manual_seed(seed)
    model = build_lm(
        mixer,
        dim,
        heads,
        vocab_size,
        layers,
        max_seq_len=max(seq_len, 64),
        mlp_ratio=mlp_ratio,
        recurrent_memory=recurrent_memory,
        **(mixer_kw or {}),
    )
    model.to(device)
    share = [num_train // len(pair_counts) + (i < num_train % len(pair_counts)) for i in range(len(pair_counts))]
    train_sets, test_sets = [], {}
    for i, (pairs, n) in enumerate(zip(pair_counts, share)):
        gen = (seq_len, pairs, vocab_size, bool(random_non_queries))
        # train seeds seed + i, test seeds seed + 10000 + i: one pair count keeps the seeds it always had
        train_sets.append(cached_mqar(n, *gen, seed + i))
        test_sets[pairs] = cached_mqar(num_test, *gen, seed + 10_000 + i)
    x_tr = torch.cat([x for x, _ in train_sets])
    y_tr = torch.cat([y for _, y in train_sets])

    stopper = EarlyStop(early_stop, early_stop_window) if early_stop else None
    step_hits: list[tuple[int, int]] = []

    def loss_fn(m, x, y):
        logits = _logits(m, x)
        if stopper is not None:
            with torch.no_grad():
                counted = y != IGNORE_INDEX
                step_hits.append((int((logits.argmax(-1)[counted] == y[counted]).sum()), int(counted.sum())))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE_INDEX)

    def stop() -> bool:
        return stopper.update(*step_hits[-1])

    t0 = time.perf_counter()
    batches = _batcher(x_tr, y_tr, batch_size, seed, device)
    final, steps_run = _train(model, batches, loss_fn, steps, lr, weight_decay, stop if stopper else None)
    train_s = time.perf_counter() - t0
    by_pairs = {p: mqar_accuracy(model, x_te, y_te, batch_size, device) for p, (x_te, y_te) in test_sets.items()}
    return {
        "accuracy": sum(by_pairs.values()) / len(by_pairs),
        "accuracy_by_pairs": by_pairs,
        "state_bytes": int(model.state_size(seq_len=seq_len, batch=1)),
        "params": _params(model),
        "final_loss": final,
        "train_s": train_s,
        "steps": steps,
        "steps_run": steps_run,
    }


@torch.no_grad()
def mqar_accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, device: str = "cpu") -> float:
    model.eval()
    correct = total = 0
    for a in range(0, x.shape[0], batch_size):
        xb, yb = x[a : a + batch_size].to(device), y[a : a + batch_size].to(device)
        pred = _logits(model, xb).argmax(-1)
        m = yb != IGNORE_INDEX
        correct += int((pred[m] == yb[m]).sum())
        total += int(m.sum())
    model.train()
    return correct / max(total, 1)


def _last_valid(x: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row (right padding)."""
    return ((x != PAD_ID).sum(1) - 1).clamp_min(0)


def _class_logits(model, x: torch.Tensor) -> torch.Tensor:
    logits = _logits(model, x)  # [B, T, V]
    last = logits[torch.arange(x.shape[0], device=x.device), _last_valid(x)]
    return last[:, LISTOPS_CLASS_OFFSET : LISTOPS_CLASS_OFFSET + NUM_CLASSES]


def train_listops(
    mixer: str,
    dim: int,
    *,
    heads: int = 1,
    layers: int = 2,
    mlp_ratio: float = 4.0,
    min_len: int = 32,
    max_len: int = 128,
    max_depth: int = 10,
    max_args: int = 10,
    num_train: int = 2000,
    num_test: int = 256,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    mixer_kw: dict | None = None,
) -> dict:
    """Train a ``layers``-layer LM with mixer ``mixer`` as a ListOps classifier.

    The class is read at the last token of each expression (causal mixers: it has seen the whole
    expression; right padding never reaches it) from 10 dedicated output rows of the LM head.
    Returns ``accuracy``, ``majority`` (share of the most frequent test label: the trivial baseline),
    ``params``, ``final_loss``, ``train_s``.
    """
    torch.manual_seed(seed)
    model = build_lm(
        mixer,
        dim,
        heads,
        VOCAB_SIZE + NUM_CLASSES,
        layers,
        max_seq_len=max_len,
        mlp_ratio=mlp_ratio,
        **(mixer_kw or {}),
    )
    model.to(device)
    x_tr, y_tr = make_listops(num_train, min_len, max_len, max_depth, max_args, seed=seed)
    x_te, y_te = make_listops(num_test, min_len, max_len, max_depth, max_args, seed=seed + 10_000)

    def loss_fn(m, x, y):
        return F.cross_entropy(_class_logits(m, x).float(), y)

    t0 = time.perf_counter()
    final, _ = _train(model, _batcher(x_tr, y_tr, batch_size, seed, device), loss_fn, steps, lr, weight_decay)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for a in range(0, num_test, batch_size):
            xb, yb = x_te[a : a + batch_size].to(device), y_te[a : a + batch_size].to(device)
            correct += int((_class_logits(model, xb).argmax(-1) == yb).sum())
    return {
        "accuracy": correct / num_test,
        "majority": float(torch.bincount(y_te, minlength=NUM_CLASSES).max()) / num_test,
        "params": _params(model),
        "final_loss": final,
        "train_s": train_s,
        "steps": steps,
    }
