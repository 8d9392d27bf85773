"""Training checkpoints: safetensors weights and optimizer state, RNG, step and configs, written atomically.

Layout of ``out_dir``::

    ckpt-000100/model.safetensors      unique parameters and buffers (a tied head stored once)
    ckpt-000100/optimizer.safetensors  per-parameter state ``state.<param name>.<key>`` and the RNG state
    ckpt-000100/meta.json              step, model and train configs, param groups, sha256 of both files
    latest                              the name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete, then ``latest``
is replaced (``os.replace``); a run killed at any point leaves the previous checkpoint intact.
:func:`load_checkpoint` verifies the checksums, the model config and every tensor's name and shape
before it touches the model or the optimizer: a corrupt or mismatched checkpoint raises
:class:`CheckpointError` and nothing is loaded.

FSDP2 runs (``fully_shard``) write the same files: :func:`save_sharded_checkpoint` gathers the full
model and optimizer state dicts to rank 0's CPU (``torch.distributed.checkpoint.state_dict``) and rank 0
writes them with :func:`save_checkpoint`; :func:`load_sharded_checkpoint` lets rank 0 verify the files,
tells every rank the verdict, and broadcasts the tensors into the local shards. A checkpoint is
therefore portable between single-process, DDP and FSDP2 runs (Zhao et al., "PyTorch FSDP: Experiences
on Scaling Fully Sharded Data Parallel", 2023).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "save_sharded_checkpoint",
]

FORMAT = 1
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model / optimizer it is loaded into."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unique(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors sharing storage with an earlier one (tied weights); return the aliases."""
    seen: dict[tuple[int, int, tuple], str] = {}
    out, aliases = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, aliases


def _optimizer_by_name(optimizer: torch.optim.Optimizer | dict, param_names: list[str]) -> dict:
    """The optimizer's state keyed by parameter name: ``{"state": {name: {key: value}}, "param_groups":
    [{..., "params": [name, ...]}]}`` (the form ``get_optimizer_state_dict`` returns for a full state dict)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer.state_dict()
        ids = [p for g in opt["param_groups"] for p in g["params"]]
        if len(ids) != len(param_names):
            raise ValueError(f"param_names has {len(param_names)} names for {len(ids)} optimizer parameters")
        name = dict(zip(ids, param_names))
        return {
            "state": {name[i]: s for i, s in opt["state"].items()},
            "param_groups": [dict(g, params=[name[i] for i in g["params"]]) for g in opt["param_groups"]],
        }
    names = [n for g in optimizer["param_groups"] for n in g["params"]]
    if names != list(param_names):
        raise ValueError(f"the optimizer state dict names parameters {names}, expected param_names {param_names}")
    return optimizer


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict,
    param_names: list[str],
    meta: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``ckpt-<step>`` under ``out_dir`` atomically and point ``latest`` at it.

    ``model_state``: the full (unsharded) state dict; ``optimizer``: the optimizer, or its full state
    dict keyed by parameter name (as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
    returns it); ``param_names``: the name of each optimizer parameter in ``param_groups`` order;
    ``meta``: JSON-able configs. Keeps the newest ``keep`` checkpoints. Returns the checkpoint's directory.

    >>> import tempfile
    >>> from torch import nn
    >>> net = nn.Linear(3, 2); opt = torch.optim.AdamW(net.parameters())
    >>> path = save_checkpoint(tempfile.mkdtemp(), 5, net.state_dict(), opt, ["weight", "bias"], {"model_config": {}})
    >>> path.name, read_checkpoint(path, ["weight", "bias"], {}, net.state_dict())["step"]
    ('ckpt-000005', 5)
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, aliases = _unique(model_state)
    opt = _optimizer_by_name(optimizer, param_names)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for name in param_names:
        for key, value in opt["state"].get(name, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{name}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    name = f"ckpt-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    save_file(weights, str(tmp / "model.safetensors"))
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    info = dict(
        meta,
        format=FORMAT,
        step=step,
        aliases=aliases,
        param_names=param_names,
        param_groups=groups,
        optimizer_scalars=scalars,
        sha256={f: _sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")},
    )
    (tmp / "meta.json").write_text(json.dumps(info, indent=1, default=str))
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd, pointer = tempfile.mkstemp(prefix=".latest.", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(name)
    os.replace(pointer, out / LATEST)
    old = sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path:
    """The directory ``out_dir/latest`` names (or ``out_dir`` itself when it is a checkpoint)."""
    out = Path(out_dir)
    if (out / "meta.json").is_file():
        return out
    pointer = out / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint to resume in {str(out)!r}: neither {LATEST!r} nor meta.json there")
    path = out / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{str(pointer)!r} names {path.name!r}, which is not a complete checkpoint")
    return path


def read_checkpoint(
    path: str | os.PathLike,
    param_names: list[str],
    model_config: dict,
    model_state: dict[str, torch.Tensor],
) -> dict:
    """Read and verify the checkpoint at ``path`` (a checkpoint directory or a run's ``out_dir``) without
    loading it anywhere: checksums, ``model_config``, every weight's name and shape against
    ``model_state`` (a state dict of the model, sharded or not: only names and global shapes are read)
    and the optimizer's parameter names against ``param_names``.

    Returns the meta (``step``, configs, history, ...) plus ``weights`` (the full state dict, tied
    entries restored), ``optimizer`` (its state keyed by parameter name, as :func:`save_checkpoint`
    takes it) and ``rng`` (the torch RNG state). Raises :class:`CheckpointError` when anything does not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json is unreadable: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    for f, digest in meta.get("sha256", {}).items():
        if not (ckpt / f).is_file() or _sha256(ckpt / f) != digest:
            raise CheckpointError(f"{ckpt / f} is missing or corrupt (sha256 differs from meta.json)")
    if meta.get("model_config") != json.loads(json.dumps(model_config, default=str)):
        saved = meta.get("model_config") or {}
        diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        raise CheckpointError(f"{ckpt}: the model config differs from the checkpoint's in {diff}")
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt}: cannot read the safetensors files: {e}") from e
    for alias, target in meta.get("aliases", {}).items():
        if target in weights:
            weights[alias] = weights[target]
    missing = sorted(set(model_state) - set(weights))
    unexpected = sorted(set(weights) - set(model_state))
    wrong = sorted(k for k in set(model_state) & set(weights) if tuple(model_state[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the model: missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    if list(meta.get("param_names", [])) != list(param_names):
        raise CheckpointError(f"{ckpt}: the optimizer's parameters differ from the checkpoint's")
    known = set(param_names)
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        name, sub = key[len("state.") :].rsplit(".", 1)
        if name not in known:
            raise CheckpointError(f"{ckpt}: optimizer state for unknown parameter {name!r}")
        state.setdefault(name, {})[sub] = value
    for name, extra in meta.get("optimizer_scalars", {}).items():
        if name not in known:
            raise CheckpointError(f"{ckpt}: optimizer state for unknown parameter {name!r}")
        state.setdefault(name, {}).update(extra)
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{ckpt}: optimizer.safetensors holds no RNG state ('rng.torch')")
    meta["weights"] = weights
    meta["optimizer"] = {"state": state, "param_groups": meta["param_groups"]}
    meta["rng"] = tensors["rng.torch"]
    meta["rng_cuda"] = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    meta["path"] = str(ckpt)
    return meta


def _grouped(saved_groups: list[dict], current_groups: list[dict], param_names: list[str], where: str) -> list[dict]:
    """The saved hyper-parameters of each group with the current groups' parameter names."""
    if len(current_groups) != len(saved_groups):
        raise CheckpointError(f"{where}: {len(saved_groups)} param groups saved, optimizer has {len(current_groups)}")
    out, i = [], 0
    for saved, g in zip(saved_groups, current_groups):
        n = len(g["params"])
        out.append(dict(saved, params=list(param_names[i : i + n])))
        i += n
    return out


def _set_rng(meta: dict) -> None:
    torch.set_rng_state(meta["rng"])
    cuda = meta.get("rng_cuda") or []
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    param_names: list[str],
    model_config: dict,
    model_state: dict[str, torch.Tensor] | None = None,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """Check the checkpoint at ``path`` (a checkpoint directory or a run's ``out_dir``) against
    ``model_config`` and the model's ``model_state`` (default ``model.state_dict()``), then load the
    weights into ``model`` (skipped when None: the caller loads the returned ``meta["weights"]``), the
    optimizer state and the RNG. ``check(meta)``: the caller's own test of the meta (e.g. the training
    options), run before anything is loaded. Returns the checkpoint's meta (``step`` etc.).
    Raises :class:`CheckpointError` before loading anything when something does not fit."""
    meta = read_checkpoint(
        path, param_names, model_config, model_state if model_state is not None else model.state_dict()
    )
    opt_state = None
    if optimizer is not None:
        current = optimizer.state_dict()
        groups = _grouped(meta["param_groups"], current["param_groups"], param_names, meta["path"])
        ids = [p for g in current["param_groups"] for p in g["params"]]
        by_name = dict(zip(param_names, ids))
        state = {by_name[n]: s for n, s in meta["optimizer"]["state"].items()}
        groups = [dict(s, params=g["params"]) for s, g in zip(groups, current["param_groups"])]
        opt_state = {"state": state, "param_groups": groups}
    if check is not None:
        check(meta)
    # everything checked: load
    if model is not None:
        model.load_state_dict(meta["weights"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    _set_rng(meta)
    return meta


# ------------------------------------------------------------------------------------------------
# FSDP2: gather to rank 0 to save, verify on rank 0 and broadcast to load
# ------------------------------------------------------------------------------------------------


def _tie_like(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries that are one parameter in ``model`` (tied weights) become one tensor in ``full`` again
    (the gathered state dict holds a copy per name), so :func:`save_checkpoint` stores them once."""
    first: dict[int, str] = {}
    out = dict(full)
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in out:
            continue
        if id(v) in first and first[id(v)] in out:
            out[k] = out[first[id(v)]]
        else:
            first.setdefault(id(v), k)
    return out


def save_sharded_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    meta: dict,
    keep: int = 2,
) -> Path | None:
    """Save an FSDP2 (``fully_shard``) run in the single-process format; a collective: every rank calls it.

    The full state dicts are gathered shard by shard to rank 0's CPU (``get_model_state_dict`` /
    ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``: no rank holds the
    unsharded model on its device) and rank 0 writes them with :func:`save_checkpoint`, RNG included.
    Returns the checkpoint's directory on rank 0, None on the others (after a barrier). Used by
    ``python -m effattn train --parallel fsdp --save-every N`` under torchrun; see ``docs/train.md``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    opt_state = get_optimizer_state_dict(model, optimizer, options=options)
    path = None
    if dist.get_rank() == 0:
        path = save_checkpoint(out_dir, step, _tie_like(model, state), opt_state, param_names, meta, keep=keep)
    dist.barrier()
    return path


def load_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    model_config: dict,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """Resume an FSDP2 run from a checkpoint in the single-process format; a collective.

    Rank 0 alone reads the files and verifies them (:func:`read_checkpoint`, the optimizer's groups and
    ``check(meta)``, which raises :class:`CheckpointError` to refuse); the verdict is broadcast, so on a
    refusal every rank raises the same :class:`CheckpointError` and nothing is loaded anywhere. Then
    ``set_model_state_dict`` / ``set_optimizer_state_dict`` (``full_state_dict=True,
    broadcast_from_rank0=True``) send each tensor from rank 0 and every rank keeps its shard; every rank
    takes rank 0's saved RNG state. Returns the meta (without tensors) on every rank.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rank = dist.get_rank()
    verdict: list = [None]
    meta: dict = {}
    failure: BaseException | None = None
    if rank == 0:
        try:
            meta = read_checkpoint(path, param_names, model_config, model.state_dict())
            groups = _grouped(meta["param_groups"], optimizer.param_groups, param_names, meta["path"])
            meta["optimizer"]["param_groups"] = groups
            if check is not None:
                check(meta)
            small = {k: v for k, v in meta.items() if k not in ("weights", "optimizer")}
            verdict = [("ok", small)]
        except Exception as e:  # every rank must learn of it, or the others wait in the broadcast below
            failure = e
            verdict = [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(verdict, src=0)
    status, payload = verdict[0]
    if status == "error":
        if failure is not None:
            raise failure
        raise CheckpointError(f"rank 0 refused the checkpoint: {payload}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, meta.get("weights", {}), options=options)
    set_optimizer_state_dict(model, optimizer, meta.get("optimizer", {}), options=options)
    if rank != 0:
        meta = payload
    _set_rng(meta)
    return {k: v for k, v in meta.items() if k not in ("weights", "optimizer", "rng", "rng_cuda")}
