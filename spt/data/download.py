"""Fetching the official ConvAI2 data into a local cache (needs network access)."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

DATASETS = {
    # ParlAI's ConvAI2 archive: train/valid in self/both x original/revised, with and without candidates.
    "convai2": "http://parl.ai/downloads/convai2/convai2_fix_723.tgz",
}


def cache_dir() -> Path:
    return Path(os.environ.get("SPT_CACHE", Path.home() / ".cache" / "spt")) / "data"


def offline_message(name: str, target: Path) -> str:
    return (
        f"cannot download {name!r}: no network access. Put the ConvAI2 text files "
        f"(e.g. train_self_original_no_cands.txt, valid_self_original_no_cands.txt) in {target} "
        f"yourself, or point --data.train/--data.valid at them."
    )


def download(name: str, timeout: float = 10.0) -> Path:
    """Download and unpack ``name`` into the cache; returns its folder. Fails fast when offline."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    target = cache_dir() / name
    if target.is_dir() and any(target.glob("*.txt")):
        log.info("%s already in %s", name, target)
        return target
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("SPT_OFFLINE") == "1":
        raise ConnectionError(offline_message(name, target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "archive.tgz"
        try:
            with urllib.request.urlopen(DATASETS[name], timeout=timeout) as r, archive.open("wb") as f:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"{offline_message(name, target)} ({e})") from None
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        files = list(unpacked.rglob("*.txt"))
        staged = Path(tmp) / name
        staged.mkdir()
        for f in files:
            f.replace(staged / f.name)
        if target.exists():
            shutil.rmtree(target)
        staged.replace(target)  # atomic: a half-download never looks complete
    log.info("downloaded %s (%d files) to %s", name, len(files), target)
    return target
