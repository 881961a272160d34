"""Checkpoints that hold only what trains, written atomically, and the loader that rebuilds a model.

A checkpoint folder:
    model.safetensors   trainable tensors only (prompts (K, n, d), retriever.*)
    config.yaml         the resolved config, including the base model's name or path
    trainer_state.pt    optimizer, scheduler, step, RNG (only where a run can resume from it)

Folders are written under a temporary name and renamed into place, so an interrupted write never
leaves a broken checkpoint: the previous one stays until the new one is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .config import Config, load_config

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.pt"


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Create ``target`` by letting ``write`` fill a temporary sibling, then swapping it in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():  # make the files durable before they become visible
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        target.rename(old)
    tmp.rename(target)
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


def save_trainable(folder: Path, tensors: dict[str, torch.Tensor], cfg: Config,
                   trainer_state: dict | None = None) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS)
        cfg.save(tmp / CONFIG)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)

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
