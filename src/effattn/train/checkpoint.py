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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

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


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    meta: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``ckpt-<step>`` under ``out_dir`` atomically and point ``latest`` at it.

    ``model_state``: the full (unsharded) state dict; ``param_names``: the name of each optimizer
    parameter in ``optimizer.param_groups`` order; ``meta``: JSON-able configs. Keeps the newest
    ``keep`` checkpoints. Returns the checkpoint's directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, aliases = _unique(model_state)
    opt = optimizer.state_dict()
    params = [p for g in opt["param_groups"] for p in g["params"]]
    if len(params) != len(param_names):
        raise ValueError(f"param_names has {len(param_names)} names for {len(params)} optimizer parameters")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, name in zip(params, param_names):
        for key, value in opt["state"].get(idx, {}).items():
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


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    param_names: list[str],
    model_config: dict,
    model_state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Check the checkpoint at ``path`` (a checkpoint directory or a run's ``out_dir``) against
    ``model_config`` and the model's ``model_state`` (default ``model.state_dict()``), then load the
    weights into ``model`` (skipped when None: the caller loads the returned ``meta["weights"]``), the
    optimizer state and the RNG. Returns the checkpoint's meta (``step`` etc.).
    Raises :class:`CheckpointError` before loading anything when something does not fit."""
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
    expected = model_state if model_state is not None else model.state_dict()
    for alias, target in meta.get("aliases", {}).items():
        if target in weights:
            weights[alias] = weights[target]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the model: missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    if list(meta.get("param_names", [])) != list(param_names):
        raise CheckpointError(f"{ckpt}: the optimizer's parameters differ from the checkpoint's")
    opt_state = None
    if optimizer is not None:
        current = optimizer.state_dict()
        if len(current["param_groups"]) != len(meta["param_groups"]):
            raise CheckpointError(
                f"{ckpt}: {len(meta['param_groups'])} param groups saved, optimizer has {len(current['param_groups'])}"
            )
        ids = [p for g in current["param_groups"] for p in g["params"]]
        by_name = dict(zip(param_names, ids))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if not key.startswith("state."):
                continue
            name, sub = key[len("state.") :].rsplit(".", 1)
            if name not in by_name:
                raise CheckpointError(f"{ckpt}: optimizer state for unknown parameter {name!r}")
            state.setdefault(by_name[name], {})[sub] = value
        for name, extra in meta.get("optimizer_scalars", {}).items():
            state.setdefault(by_name[name], {}).update(extra)
        groups = [dict(saved, params=g["params"]) for saved, g in zip(meta["param_groups"], current["param_groups"])]
        opt_state = {"state": state, "param_groups": groups}
    # everything checked: load
    if model is not None:
        model.load_state_dict(weights, strict=True)
    meta["weights"] = weights
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return meta
