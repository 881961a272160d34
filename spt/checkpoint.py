"""Checkpoints that hold only what trains, written atomically, and the loader that rebuilds a model.

A checkpoint folder:
    model.safetensors   trainable tensors only (prompts (K, n, d), retriever.*)
    config.yaml         the resolved config, including the base model's name or path
    trainer_state.json  optimizer, scheduler, step, RNG (only where a run can resume from it), with its
    trainer_state.safetensors   tensors: plain data, so loading a checkpoint never runs code

Folders are written under a temporary name and renamed into place, so an interrupted write never
leaves a broken checkpoint: the previous one stays until the new one is complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, load_config

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.json"  # everything but tensors, as JSON
TRAINER_TENSORS = "trainer_state.safetensors"  # the tensors it refers to
LEGACY_TRAINER_STATE = "trainer_state.pt"  # written by spt <= 0.1 with torch.save (a pickle)


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Create ``target`` by letting ``write`` fill a temporary sibling, then swapping it in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.rglob("*"):  # make the files durable before they become visible
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:  # a full disk, Ctrl-C...: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path, prefer: str = "checkpoint-best") -> Path:
    """A checkpoint folder from a checkpoint or run folder (run folders: best, then last)."""
    path = Path(path)
    if (path / CONFIG).is_file() and ((path / WEIGHTS).is_file() or (path / "adapter_config.json").is_file()
                                      or (path / "config.json").is_file()):
        return path
    for name in (prefer, "checkpoint-last", "checkpoint-best"):
        cand = path / name
        if (cand / CONFIG).is_file():
            return cand
        stale = [p for p in path.glob(f".{name}.old-*") if (p / CONFIG).is_file()]  # crash between renames
        if stale:
            return stale[0]
    raise FileNotFoundError(f"{path} is not a checkpoint folder (expected {CONFIG} and {WEIGHTS}) "
                            f"or a run folder with checkpoint-best/ or checkpoint-last/")


def checkpoint_config(folder: Path, overrides: dict | None = None) -> Config:
    """The config saved in a checkpoint folder. Checkpoints written before ``spt.recipe`` existed trained
    with the paper's equations: their saved spt section (every field, e.g. tau_gold) has no recipe."""
    import yaml

    path = Path(folder) / CONFIG
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    spt = saved.get("spt") if isinstance(saved, dict) else None
    if isinstance(spt, dict) and "tau_gold" in spt and "recipe" not in spt:
        overrides = {"spt.recipe": "paper", **(overrides or {})}
    return load_config(path, overrides)


def _is_local_path(name: str) -> bool:
    """True when ``name`` can only mean a folder (absolute, ``~``, ``./``, or not a valid hub repo id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(name) or name.startswith(("~", ".")) or "\\" in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_base_model(cfg: Config, checkpoint: Path | None = None) -> None:
    """Fail with one line when the base model (or tokenizer) the config loads from is a local folder that
    does not exist, e.g. a run whose base model was moved or deleted, instead of the hub's "Repo id must
    be in the form ..." error. Names the config that expects it and the flag that overrides it."""
    if cfg.model.init == "scratch" or (checkpoint is not None and cfg.method == "finetune"):
        return  # built from scratch, or the fine-tuned LM is the checkpoint itself: no base model is loaded
    for field, name in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
        if not name or not _is_local_path(name) or Path(name).expanduser().exists():
            continue
        if checkpoint is None:
            raise FileNotFoundError(f"{field} {name!r}: no such folder")
        raise FileNotFoundError(f"{Path(checkpoint) / CONFIG}: the run's base model ({field}) {name!r} does not "
                                f"exist (moved or deleted?); load it from where it is now with --{field}=NEW_PATH")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of a trainer-state tree; tensors and arrays go to ``tensors`` and leave a reference."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iub"
                                                                          else np.float64))
        return {"__ndarray__": name, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, where)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(f"trainer state{where}: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    """Inverse of ``_encode``: builds only plain values, tensors and arrays (nothing is executed)."""
    if isinstance(obj, list):
        return [_decode(v, tensors, path) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        name = obj.get("__tensor__", obj.get("__ndarray__"))
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"{path}: refers to tensor {name!r}, which {path.with_name(TRAINER_TENSORS)} lacks")
        if "__tensor__" in obj:
            return tensors[name]
        return tensors[name].numpy().astype(np.dtype(str(obj.get("dtype", "float64"))))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, path) for v in obj["__tuple__"])
    if "__float__" in obj:
        value = obj["__float__"]
        if value not in ("inf", "-inf", "nan"):
            raise ValueError(f"{path}: bad non-finite float {value!r}")
        return float(value)
    if "__dict__" in obj:
        return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors, path) for k, v in obj.items()}


def write_trainer_state(folder: Path, state: dict) -> None:
    """Optimizer, scheduler, RNG and loop state as JSON + safetensors: reading it back runs no code."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "")
    save_file(tensors, folder / TRAINER_TENSORS)
    (folder / TRAINER_STATE).write_text(json.dumps(encoded, allow_nan=False), encoding="utf-8")


def has_trainer_state(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file() or (folder / LEGACY_TRAINER_STATE).is_file()


def read_trainer_state(folder: Path) -> dict:
    """The state ``write_trainer_state`` wrote. A checkpoint is untrusted input: nothing in it is executed
    (JSON and safetensors only; a legacy ``trainer_state.pt`` is read with ``weights_only=True``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / TRAINER_STATE
    if not path.is_file():
        return _read_legacy_trainer_state(folder / LEGACY_TRAINER_STATE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tensors = load_file(folder / TRAINER_TENSORS) if (folder / TRAINER_TENSORS).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise ValueError(f"{path}: unreadable trainer state ({e}); resume from another checkpoint") from None
    state = _decode(data, tensors, path)
    missing = [k for k in ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: trainer state lacks {', '.join(missing)}")
    return state


def _read_legacy_trainer_state(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {TRAINER_STATE}; only checkpoint-last can be resumed")
    # numpy's RNG state is the one non-tensor object the old format held: allow exactly its types
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as e:  # any failure means: not loadable without running code
        raise ValueError(f"{path}: an old-format trainer state that cannot be read safely ({str(e).splitlines()[0]}); "
                         f"it is never unpickled with code execution. Start a new run from its weights instead "
                         f"(--model.name_or_path / a fresh --output-dir)") from None



def save_trainable(folder: Path, tensors: dict[str, torch.Tensor], cfg: Config,
                   trainer_state: dict | None = None) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS)
        cfg.save(tmp / CONFIG)
        if trainer_state is not None:
            write_trainer_state(tmp, trainer_state)

    atomic_dir(folder, write)


def read_trainable(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}")
    return load_file(folder / WEIGHTS)


def check_shapes(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path,
                 base: str) -> None:
    """Clear error when a checkpoint does not fit its base model (K, n or d, or missing tensors)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(f"{where / WEIGHTS}: tensors do not match the model built from its config "
                         f"(missing {missing}, unexpected {extra})")
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            what = " (K, n virtual tokens, d model width)" if name == "prompts" else ""
            raise ValueError(f"{where / WEIGHTS}: {name} has shape {tuple(found[name].shape)}, but base model "
                             f"{base!r} with this config expects {tuple(tensor.shape)}{what}")
