"""ListOps: nested list operations, the reasoning task of Long Range Arena.

Nangia & Bowman, "ListOps: A Diagnostic Dataset for Latent Tree Learning" (2018); Tay et al.,
"Long Range Arena: A Benchmark for Efficient Transformers" (2021). An expression is a digit
``0..9`` or ``[OP a_1 ... a_m ]`` with ``2 <= m <= max_args`` arguments that are expressions, and
``OP`` one of

- ``MIN``, ``MAX``: the smallest / largest argument;
- ``MED``: the median, truncated to an int (``int(median)``, as LRA's generator);
- ``SM``: the sum modulo 10.

The tree is drawn as in LRA: at depth ``d < max_depth`` a node is an operator with probability
:data:`OPERATOR_P` (0.25) and a digit otherwise; at ``max_depth`` it is a digit. Examples whose
token count lies in ``[min_len, max_len]`` are kept (rejection sampling; the root is drawn as an
operator whenever ``min_len > 1``, which is the same distribution conditioned on the length). The
label (10 classes) is the expression's value. LRA uses length 500-2000, depth 10, 10 arguments.

Tokens: ``0`` padding (on the right), digits ``0..9`` -> ``1..10``, ``[MIN [MAX [MED [SM`` ->
``11..14``, ``]`` -> ``15``; :data:`VOCAB_SIZE` = 16.

Example::

    >>> x, y = make_listops(8, min_len=5, max_len=40, max_depth=4, max_args=4, seed=0)
    >>> x.shape[0], int(y.max()) < 10
    (8, True)
"""

from __future__ import annotations

import random

import torch

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
PAD_ID = 0
TOKEN_IDS = {str(d): d + 1 for d in range(10)} | {op: 11 + i for i, op in enumerate(OPERATORS)} | {CLOSE: 15}
ID_TOKENS = {i: t for t, i in TOKEN_IDS.items()}
VOCAB_SIZE = 16
NUM_CLASSES = 10
OPERATOR_P = 0.25
MAX_TRIES_PER_EXAMPLE = 100_000


def _draw(rng: random.Random, depth: int, max_depth: int, max_args: int, force_op: bool, out: list[str]) -> None:
    """Append one random expression's tokens to ``out`` (depth 1 is the root)."""
    if not force_op and (depth >= max_depth or rng.random() >= OPERATOR_P):
        out.append(str(rng.randrange(10)))
        return
    out.append(rng.choice(OPERATORS))
    for _ in range(rng.randint(2, max_args)):
        _draw(rng, depth + 1, max_depth, max_args, False, out)
    out.append(CLOSE)


def evaluate(tokens: list[str]) -> int:
    """The value of a token list (iterative, with a stack of open operators)."""
    stack: list[tuple[str, list[int]]] = []
    result = None
    for tok in tokens:
        if tok in OPERATORS:
            stack.append((tok, []))
        elif tok == CLOSE:
            op, args = stack.pop()
            if op == "[MIN":
                val = min(args)
            elif op == "[MAX":
                val = max(args)
            elif op == "[MED":
                s = sorted(args)
                m = len(s) // 2
                val = s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2
            else:
                val = sum(args) % 10
            if stack:
                stack[-1][1].append(val)
            else:
                result = val
        else:
            d = int(tok)
            if stack:
                stack[-1][1].append(d)
            else:
                result = d
    if stack or result is None:
        raise ValueError("unbalanced ListOps expression")
    return result


def depth_of(tokens: list[str]) -> int:
    """Nesting depth of an expression (a lone digit has depth 1, ``[MAX 1 2 ]`` depth 2)."""
    d = best = 0
    for tok in tokens:
        if tok in OPERATORS:
            d += 1
            best = max(best, d)
        elif tok == CLOSE:
            d -= 1
    return best + 1


def generate_expressions(
    num_examples: int, min_len: int, max_len: int, max_depth: int = 10, max_args: int = 10, seed: int = 0
) -> list[list[str]]:
    """``num_examples`` random expressions (token lists) with ``min_len <= len <= max_len``."""
    if min_len < 1 or max_len < min_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {max_depth}, {max_args}")
    if min_len > 1 and max_depth < 2:
        raise ValueError(f"max_depth=1 allows only single digits, but min_len={min_len}")
    rng = random.Random(seed)
    out: list[list[str]] = []
    tries = 0
    while len(out) < num_examples:
        tries += 1
        if tries > MAX_TRIES_PER_EXAMPLE * num_examples:
            raise ValueError(f"could not draw expressions of length {min_len}..{max_len} with depth {max_depth}")
        toks: list[str] = []
        _draw(rng, 1, max_depth, max_args, min_len > 1, toks)
        if min_len <= len(toks) <= max_len:
            out.append(toks)
    return out


def tokenize(expressions: list[list[str]], length: int | None = None) -> torch.Tensor:
    """Token ids ``[N, length]`` (right padding with :data:`PAD_ID`; default: the longest)."""
    length = length or max(len(e) for e in expressions)
    ids = torch.full((len(expressions), length), PAD_ID, dtype=torch.long)
    for i, e in enumerate(expressions):
        if len(e) > length:
            raise ValueError(f"expression {i} has {len(e)} tokens > length={length}")
        ids[i, : len(e)] = torch.tensor([TOKEN_IDS[t] for t in e])
    return ids


def detokenize(ids: torch.Tensor) -> list[str]:
    """Token strings of one row of ids (padding dropped)."""
    return [ID_TOKENS[int(i)] for i in ids if int(i) != PAD_ID]


def make_listops(
    num_examples: int,
    min_len: int = 32,
    max_len: int = 128,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ListOps examples: ``(inputs [N, max_len] long, labels [N] long in 0..9)``, padded to ``max_len``."""
    exprs = generate_expressions(num_examples, min_len, max_len, max_depth, max_args, seed)
    labels = torch.tensor([evaluate(e) for e in exprs], dtype=torch.long)
    return tokenize(exprs, max_len), labels
