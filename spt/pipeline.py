"""The generate and evaluate steps as functions (the CLI and the experiment runner call these)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_config, resolve_checkpoint
from .config import Config, load_config
from .data import read_examples

log = logging.getLogger(__name__)


def generate_file(run: str | Path, data: str | None = None, out: str | Path | None = None, limit: int | None = None,
                  gen_overrides: dict[str, Any] | None = None, data_format: str | None = None,
                  progress: bool = True) -> Path:
    """Generate for every example of ``data`` with the run's model; write predictions JSONL (atomically)."""
    from .api import load

    bot = load(run)
    cfg = bot.config
    gen = {**dataclasses.asdict(cfg.generate), **(gen_overrides or {})}
    gen_cfg = load_config(None, {f"generate.{k}": v for k, v in gen.items()}).generate  # validated
    data = data or cfg.data.test or cfg.data.valid
    if not data:
        raise ValueError("no data to generate for: pass --data FILE")
    examples = read_examples(data, data_format or cfg.data.format, cfg.data.strict)
    if limit:
        examples = examples[:limit]
    outputs = bot.generate(examples, progress=progress, **dataclasses.asdict(gen_cfg))
    out = Path(out) if out else Path(run) / "predictions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex, g in zip(examples, outputs, strict=True):
            row = {"dialogue_id": ex.dialogue_id, "turn": ex.turn, "persona": list(ex.persona),
                   "context": list(ex.context), "reference": ex.response, "prediction": g.prediction, "raw": g.raw,
                   "prompt": g.prompt, "scores": g.scores, "ref_nll": g.ref_nll, "ref_tokens": g.ref_tokens}
            if g.ref_nll_by_prompt is not None:
                row["ref_nll_by_prompt"] = g.ref_nll_by_prompt
            if ex.style:
                row["style"] = ex.style
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def run_config(run: Path, overrides: dict[str, Any] | None = None) -> Config:
    try:
        return checkpoint_config(resolve_checkpoint(run), overrides)
    except FileNotFoundError:
        return load_config(None, overrides)


def evaluate_file(run: str | Path, predictions: str | Path | None = None, out: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> tuple[dict, Path]:
    """Score predictions and write metrics.json, report.md and plots; returns (metrics, report path)."""
    from .report import compute_metrics, read_predictions, write_report

    run = Path(run)
    cfg = run_config(run, overrides)
    K = cfg.spt.K if cfg.method in ("spt", "pt") else None
    rows = read_predictions(Path(predictions) if predictions else run / "predictions.jsonl")
    metrics = compute_metrics(rows, cfg.eval, K)
    report = write_report(Path(out) if out else run / "eval", run.name, metrics, rows, run if run.is_dir() else None,
                          cfg.eval.samples)
    return metrics, report
