"""The generate and evaluate steps as functions (the CLI and the experiment runner call these)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import distributed
from .checkpoint import checkpoint_config, resolve_checkpoint
from .config import Config, load_config
from .data import DataError, read_examples

log = logging.getLogger(__name__)


def generate_file(run: str | Path, data: str | None = None, out: str | Path | None = None, limit: int | None = None,
                  gen_overrides: dict[str, Any] | None = None, data_format: str | None = None,
                  progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """Generate for every example of ``data`` with the run's model; write predictions JSONL (atomically).

    ``limit``: the first N examples only (N >= 1). ``overrides``: dotted config overrides applied to the
    run's saved config before the model is loaded, e.g. {"model.name_or_path": NEW_PATH} when the base
    model moved. The data is read and checked before the model is loaded; on any failure no predictions
    file and no temp file is left. A reference that does not fit data.max_length gets ``ref_nll: null``
    (see :func:`spt.generate.reference_nll`)."""
    from .api import load

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a number of examples >= 1, got {limit!r}")
    out = Path(out) if out else Path(run) / "predictions.jsonl"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the predictions file's path")
    gen = {f"generate.{k}": v for k, v in (gen_overrides or {}).items()}
    saved = checkpoint_config(resolve_checkpoint(run), {**(overrides or {}), **gen})  # validated with the run's
    gen_cfg = saved.generate  # data.max_length, which max_new_tokens must leave room within
    data = data or saved.data.test or saved.data.valid
    if not data:
        raise ValueError("no data to generate for: pass --data FILE")
    examples = read_examples(data, data_format or saved.data.format, saved.data.strict)
    if limit:
        examples = examples[:limit]
    rank, world, device = distributed.init_from_launcher()  # under accelerate launch: a shard per process
    with _hf_progress(progress):
        bot = load(run, device=device, overrides=overrides)
    mine = distributed.shard(examples, rank, world)
    outputs = distributed.gather_objects(bot.generate(mine, progress=progress and rank == 0,
                                                      **dataclasses.asdict(gen_cfg)))
    if rank > 0:  # rank 0 writes the file, in the original order
        distributed.barrier()
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    meta = provenance_path(out)
    info = provenance(run, bot.config, data, len(examples), limit, dataclasses.asdict(gen_cfg))
    try:
        write_json_atomic(meta, info)
        with tmp.open("w", encoding="utf-8") as f:
            for ex, g in zip(examples, outputs, strict=True):
                row = {"dialogue_id": ex.dialogue_id, "turn": ex.turn, "persona": list(ex.persona),
                       "context": list(ex.context), "reference": ex.response, "prediction": g.prediction,
                       "raw": g.raw, "prompt": g.prompt, "scores": g.scores, "ref_nll": g.ref_nll,
                       "ref_tokens": g.ref_tokens}
                if g.ref_nll_by_prompt is not None:
                    row["ref_nll_by_prompt"] = g.ref_nll_by_prompt
                if ex.style:
                    row["style"] = ex.style
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise
    distributed.barrier()
    return out


def provenance_path(predictions: Path) -> Path:
    """Where a predictions file's provenance lives: ``predictions.jsonl`` -> ``predictions.provenance.json``."""
    return predictions.with_name(predictions.name.removesuffix(".jsonl") + ".provenance.json")


def provenance(run: str | Path, cfg, data: str, n: int, limit: int | None, generation: dict) -> dict[str, Any]:
    """How a predictions file was made: run, checkpoint and its step, base model, data file with its hash
    and example count, generation settings, seeds and the spt version."""
    import time

    from . import __version__

    run, ckpt = Path(run).resolve(), resolve_checkpoint(run).resolve()
    summary_path = (ckpt.parent if ckpt.name.startswith("checkpoint-") else ckpt) / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"spt_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": str(run), "checkpoint": str(ckpt), "trained_steps": summary.get("step"),
            "best_val_loss": summary.get("best_val_loss"), "method": cfg.method,
            "base_model": cfg.model.name_or_path, "K": cfg.spt.K if cfg.method in ("spt", "pt") else None,
            "train_seed": cfg.train.seed, "data": str(Path(data).resolve()), "data_sha256": sha256_file(data),
            "examples": n, "limit": limit, "generation": generation}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False), encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' "Loading weights" bars on stderr only where progress is wanted (not with --no-progress)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def run_config(run: Path, overrides: dict[str, Any] | None = None) -> tuple[Config, bool]:
    """The run's saved config with ``overrides`` and True, or the defaults with them and False (no run)."""
    try:
        return checkpoint_config(resolve_checkpoint(run), overrides), True
    except FileNotFoundError:
        return load_config(None, overrides), False


def evaluate_file(run: str | Path, predictions: str | Path | None = None, out: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> tuple[dict, Path]:
    """Score predictions and write metrics.json, report.md and plots; returns (metrics, report path).

    Every row is checked first (see :func:`spt.report.read_predictions`: a row that cannot be used is a
    DataError naming file:line and field, and nothing is written). K, for the prompt-selection
    histogram, is the run's spt.K (or ``--spt.K``); without a run config it is inferred from the rows."""
    from .report import compute_metrics, read_predictions, write_report

    run = Path(run)
    cfg, from_run = run_config(run, overrides)
    explicit_k = "spt.K" in (overrides or {})
    K = cfg.spt.K if cfg.method in ("spt", "pt") and (from_run or explicit_k) else None
    pred_path = Path(predictions) if predictions else run / "predictions.jsonl"
    rows = read_predictions(pred_path)
    metrics = compute_metrics(rows, cfg.eval, K)
    meta = provenance_path(pred_path)
    if meta.is_file():  # made by spt generate: say how, next to the numbers
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(meta, None, f"unreadable provenance ({e})") from None
        if isinstance(info, dict) and info.get("examples") not in (None, len(rows)):
            log.warning("%s: %d rows, but its provenance says %s examples were generated", pred_path, len(rows),
                        info.get("examples"))
        metrics["provenance"] = info
    else:
        metrics["provenance"] = {"predictions": str(pred_path.resolve()), "note": "no provenance file"}
    report = write_report(Path(out) if out else run / "eval", run.name, metrics, rows, run if run.is_dir() else None,
                          cfg.eval.samples)
    return metrics, report
