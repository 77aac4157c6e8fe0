"""Atomic, verified checkpoints.

A checkpoint is a directory ``<root>/step-00000100/`` holding safetensors files and small JSON
files, plus ``manifest.json`` (size and sha256 of every file) written last. Writes go to a hidden
temporary directory that is fsynced and renamed into place, so an interrupted save leaves no
directory that looks like a checkpoint; loading verifies the manifest first and refuses a missing,
truncated or altered file before a single tensor is read.

Example::

    from colossus.checkpoint import CheckpointWriter, verify_checkpoint
    with CheckpointWriter("runs/demo/checkpoints", step=10) as ckpt:
        ckpt.save_tensors("model.safetensors", {"w": torch.zeros(3)})
        ckpt.save_json("trainer_state.json", {"step": 10})
    verify_checkpoint("runs/demo/checkpoints/step-00000010")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colossus.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointWriter:
    """Collective context manager: every rank enters it and writes its own files; on exit rank 0
    writes the manifest and renames the directory into place. If any rank's block raises, the
    temporary directory is left hidden (and removed by the next save) and nothing is published."""

    def __init__(self, root: str | Path, step: int, keep_last: int | None = None):
        self.root = Path(root)
        self.step = step
        self.keep_last = keep_last
        self.final = self.root / step_dir_name(step)
        self.tmp = self.root / f".{step_dir_name(step)}.tmp"

    def __enter__(self) -> CheckpointWriter:
        if _is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise CheckpointError(f"checkpoint directory {self.root} is not writable")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        _barrier()
        return self

    # ---- writing (each rank its own files) ------------------------------------------------
    def path(self, name: str) -> Path:
        return self.tmp / name

    def save_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        p = self.path(name)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(p),
            metadata=metadata,
        )
        _fsync_path(p)

    def save_module(self, name: str, module: torch.nn.Module) -> None:
        """A module's state with one copy of tied weights (GPT-2 lm_head/wte), as
        ``safetensors.torch.save_model`` writes it (same kept names and metadata), but also for
        parameters that are views of one shared buffer (``Lamb(flat=True)``), which
        ``save_model`` refuses; see :func:`module_tensors`."""
        p = self.path(name)
        tensors, metadata = module_tensors(module)
        save_file(tensors, str(p), metadata=metadata)
        _fsync_path(p)

    def save_json(self, name: str, obj: Any) -> None:
        p = self.path(name)
        with open(p, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def save_text(self, name: str, text: str) -> None:
        p = self.path(name)
        with open(p, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return  # the hidden tmp dir is never mistaken for a checkpoint
        _barrier()
        if _is_main():
            files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": self.step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "files": {
                    str(p.relative_to(self.tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in files
                },
            }
            with open(self.tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_path(self.tmp)
            if self.final.exists():  # re-saving one step: move the old one aside first
                old = self.root / f".{self.final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
            _fsync_path(self.root)
            if self.keep_last:
                prune_checkpoints(self.root, self.keep_last)
        _barrier()


def module_tensors(
    module: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """``module.state_dict()`` ready for ``save_file``: names of one tied tensor (same storage,
    offset, shape and strides) are kept once, under the first name in sorted order, the
    dropped ones recorded in the metadata as ``{dropped: kept}``, exactly as ``save_model``
    does. Unlike ``save_model`` it does not require a kept tensor to cover its whole storage:
    the parameters of a flat optimizer (``Lamb(flat=True)``) are disjoint views of one buffer,
    which ``save_file`` writes in place (no copy). Only tensors that overlap without being the
    same (a buffer that is a slice of a parameter) are cloned, one by one, since ``save_file``
    refuses overlapping ones.

    Example::

        >>> import torch
        >>> buf = torch.arange(8.0)
        >>> m = torch.nn.Module()
        >>> m.a, m.b = torch.nn.Parameter(buf[:4].view(2, 2)), torch.nn.Parameter(buf[4:])
        >>> m.c = m.a  # tied
        >>> t, meta = module_tensors(m)
        >>> sorted(t), meta, t["b"].data_ptr() == buf[4:].data_ptr()
        (['a', 'b'], {'c': 'a'}, True)
    """
    sd = module.state_dict(keep_vars=False)
    by_view: dict[tuple[Any, ...], list[str]] = {}
    for k, v in sd.items():
        key = (
            (v.device, v.dtype, v.data_ptr(), tuple(v.shape), v.stride())
            if v.numel() and v.device.type != "meta"
            else (k,)  # empty tensors share no data
        )
        by_view.setdefault(key, []).append(k)
    kept: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for names in by_view.values():
        keep, *dropped = sorted(names)
        kept[keep] = sd[keep].contiguous()
        metadata.update({d: keep for d in dropped})
    # byte ranges per storage; a tensor overlapping an earlier one gets its own copy
    spans: dict[tuple[Any, int], list[tuple[int, int, str]]] = {}
    for k, v in kept.items():
        if v.numel():
            start = v.data_ptr()
            spans.setdefault((v.device, v.untyped_storage().data_ptr()), []).append(
                (start, start + v.numel() * v.element_size(), k)
            )
    for ranges in spans.values():
        ranges.sort()
        end = -1
        for start, stop, k in ranges:
            if start < end:
                kept[k] = kept[k].clone()
            else:
                end = stop
    tensors = {k: kept[k] for k in sd if k in kept}  # the module's order
    return tensors, (metadata or None)


def load_module(
    module: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu"
) -> tuple[list[str], list[str]]:
    """Load a file written by :meth:`CheckpointWriter.save_module` into ``module`` in place
    (``load_state_dict`` copies into the existing parameters, so flat-optimizer views stay
    views; ``safetensors.torch.load_model`` refuses such a module). Returns ``(missing,
    unexpected)``; a name the file dropped as tied (its metadata) is not missing when it is tied
    to the loaded name in ``module`` too (the same tensor), so the load filled it."""
    tensors = load_tensors(path, device)
    try:
        with safe_open(str(path), framework="pt") as f:
            dropped = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"could not read {path}: {e}") from None
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    own = module.state_dict(keep_vars=True)

    def filled(k: str) -> bool:
        kept = dropped.get(k)
        return kept in tensors and kept in own and own[kept] is own[k]

    return [k for k in missing if not filled(k)], list(unexpected)


# ---- reading --------------------------------------------------------------------------------


def verify_checkpoint(path: str | Path, deep: bool = True) -> dict[str, Any]:
    """Check the manifest against the files; returns the manifest or raises CheckpointError."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist")
    mf = p / MANIFEST
    if not mf.is_file():
        raise CheckpointError(
            f"checkpoint {p} has no {MANIFEST}: it is incomplete (an interrupted save?) and was not loaded"
        )
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {p}: {MANIFEST} is unreadable ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {p}: format version {manifest.get('format_version')} != {FORMAT_VERSION}"
        )
    for name, info in files.items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {p}: file {name} listed in the manifest is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {p}: {name} is {size} bytes, the manifest says {info['bytes']} (truncated or altered); refusing to load"
            )
        if deep and _sha256(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {p}: {name} does not match its sha256 in the manifest (altered or corrupt); refusing to load"
            )
    return manifest


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoints under ``root`` (those with a manifest), oldest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    found = [
        (int(m.group(1)), d)
        for d in r.iterdir()
        if (m := _STEP_RE.match(d.name)) and (d / MANIFEST).is_file()
    ]
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    cks = list_checkpoints(root)
    return cks[-1] if cks else None


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    for d in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"could not read {path}: {e}") from None


def load_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {path}: {e}") from None


# ---- optimizer state <-> safetensors --------------------------------------------------------


def optimizer_state_to_tensors(
    sd: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, kv in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(kv)
    groups = meta["param_groups"]
    for g in groups:  # JSON turns tuples into lists; torch compares betas as a tuple
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
