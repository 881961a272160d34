"""Evaluation reports people can read: metrics.json, a Markdown report and PNG plots; run comparison."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from . import metrics as M
from .config import EvalConfig
from .data import DataError
from .data.readers import parse_json_line

log = logging.getLogger(__name__)

# (key in metrics.json, column title) in the layout of the paper's table
TABLE = [("n", "n"), ("f1", "F1"), ("bleu", "BLEU"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
         ("rougeL", "ROUGE-L"), ("bertscore_f1", "BERTScore"), ("dist1", "DIST-1"), ("dist2", "DIST-2"),
         ("meteor", "METEOR"), ("ppl", "PPL"), ("train_min", "train min")]
LOWER_IS_BETTER = {"ppl"}
NOT_QUALITY = {"n", "train_min"}  # shown in tables, left out of differences and AVG
SKIPPED = {"bertscore_f1": "bertscore_skipped", "meteor": "meteor_skipped"}  # shown as n/a when skipped
PER_EXAMPLE_KEY = "_per_example"  # compute_metrics -> write_report only; never in metrics.json


MAX_TEXT_CHARS = 100_000  # a prediction or reference longer than this is refused (ROUGE alone takes ~2 s on it)


def read_predictions(path: str | Path) -> list[dict]:
    """The rows of a predictions JSONL (as ``spt generate`` writes them), validated before anything is scored.

    Policy: a row that cannot be used is an error, never a silent skip. A :class:`~spt.data.DataError`
    names the file, the line and the field (the CLI prints it on one line and exits 2), and nothing is
    written. Unusable means: not UTF-8, not JSON, not a JSON object, ``prediction``/``reference`` missing or
    not strings (or longer than ``MAX_TEXT_CHARS``), or a field the metrics read (``prompt``, ``ref_nll``,
    ``ref_tokens``, ``ref_nll_by_prompt``, ``persona``, ``context``, ``style``) of the wrong type; a
    ``ref_nll`` must be a finite number >= 0 with ``ref_tokens`` >= 1. Blank lines and a UTF-8 byte-order
    mark are ignored. Two things are counted instead: a row with ``ref_nll: null`` (a reference that was
    not scored, e.g. longer than data.max_length) is left out of PPL, and a ``prompt`` outside 0..K-1 is
    left out of the selection histogram (see :func:`compute_metrics`); both are warned about and reported
    in metrics.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file (run spt generate first)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror or e}") from None
    rows = []
    for i, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, i, f"not UTF-8 text (byte {e.start} of the line)") from None
        if i == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        rows.append(_check_row(path, i, parse_json_line(path, i, line)))
    if not rows:
        raise DataError(path, None, "no predictions (the file is empty)")
    return rows


def _kind(value: Any) -> str:
    """A JSON value's kind for messages ("a number", "a list"...), never the value itself (it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A found value for a message: numbers as numbers, anything else by its kind (it may be huge)."""
    if not _is_number(value):
        return _kind(value)
    try:
        return f"{float(value):.6g}"
    except OverflowError:
        return "a number too large for a float"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any, minimum: float) -> bool:
    """A number (not a boolean), finite even as a float (JSON integers can be too large for one), >= minimum."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value)) and value >= minimum
    except OverflowError:
        return False


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _finite(value, minimum)


def _check_row(path: Path, line: int, row: Any) -> dict:
    def bad(field: str, expected: str) -> DataError:
        if field not in row:
            return DataError(path, line, f"field {field!r} is missing (expected {expected})")
        return DataError(path, line, f"field {field!r}: expected {expected}, found {_show(row[field])}")

    if not isinstance(row, dict):
        raise DataError(path, line, f"expected a JSON object (one prediction per line), found {_kind(row)}")
    for key in ("prediction", "reference"):
        text = row.get(key)
        if not isinstance(text, str):
            raise bad(key, "a string")
        if len(text) > MAX_TEXT_CHARS:
            raise DataError(path, line, f"field {key!r}: {len(text)} characters, more than the {MAX_TEXT_CHARS} "
                                        "spt eval scores")
        _check_unicode(path, line, key, text)
    for key in ("persona", "context"):
        value = row.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise bad(key, "a list of strings")
        for s in value or []:
            _check_unicode(path, line, key, s)
    style = row.get("style")
    if style is not None and not isinstance(style, str):
        raise bad("style", "a string or null")
    _check_unicode(path, line, "style", style or "")
    prompt = row.get("prompt")
    if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int)):
        raise bad("prompt", "an integer prompt index or null")
    nll, tokens = row.get("ref_nll"), row.get("ref_tokens")
    if nll is not None:
        if not _finite(nll, 0):
            raise bad("ref_nll", "a finite number >= 0 or null")
        if not _is_count(tokens, 1):
            raise bad("ref_tokens", "an integer >= 1 where ref_nll is set")
    elif tokens is not None and not _is_count(tokens, 0):
        raise bad("ref_tokens", "an integer >= 0")
    by_prompt = row.get("ref_nll_by_prompt")
    if by_prompt is not None:
        if not (isinstance(by_prompt, list) and by_prompt and all(_finite(v, 0) for v in by_prompt)):
            raise bad("ref_nll_by_prompt", "a non-empty list of finite numbers >= 0")
        if nll is None:
            raise DataError(path, line, "field 'ref_nll': null, but ref_nll_by_prompt is set")
    return row


def _check_unicode(path: Path, line: int, field: str, text: str) -> None:
    """JSON's "\\ud800" escapes give lone surrogates, which cannot be written to report.md."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(path, line, f"field {field!r}: not valid Unicode text (lone surrogate at character "
                                    f"{e.start})") from None


def compute_metrics(rows: list[dict], cfg: EvalConfig, K: int | None = None) -> dict:
    """Every metric of the rows (from :func:`read_predictions`). ``K``: the run's number of prompts (None:
    inferred from the largest prompt index).

    PPL is over the rows with a ``ref_nll``; rows without one (references spt generate could not score,
    e.g. longer than data.max_length, which training skips too) are left out, counted in ``ppl_unscored``
    and warned about. PPL is left out when no reference has tokens to score (never NaN). A ``prompt``
    outside 0..K-1 is left out of the selection histogram and counted in ``selection_out_of_range``.
    Each row's METEOR and BERTScore F1 are under ``PER_EXAMPLE_KEY`` (:func:`write_report` moves them to
    ``per_example.jsonl``, for bootstrap intervals: see :mod:`spt.bootstrap`)."""
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    out: dict = {"n": len(rows), **M.text_metrics(preds, refs)}
    scored = [r for r in rows if r.get("ref_nll") is not None]
    if scored:
        ppl = M.perplexity([r["ref_nll"] for r in scored], [r["ref_tokens"] for r in scored])
        if ppl is not None:
            out["ppl"] = ppl
        if len(scored) < len(rows):
            out["ppl_unscored"] = len(rows) - len(scored)
            log.warning("PPL is over %d of %d references: %d have no ref_nll (not scored by spt generate, e.g. "
                        "longer than data.max_length)", len(scored), len(rows), len(rows) - len(scored))
    per_example: dict[str, list[float]] = {}  # kept in eval/per_example.jsonl for bootstrap intervals
    bs = M.bertscore(preds, refs, cfg.bertscore_model, cfg.bertscore_layers)
    if "skipped" in bs:
        out["bertscore_skipped"] = bs["skipped"]
        log.warning("BERTScore skipped (n/a in the report): %s", bs["skipped"])
    else:
        out.update({"bertscore_p": bs["precision"], "bertscore_r": bs["recall"], "bertscore_f1": bs["f1"],
                    "bertscore_model": bs["model"], "bertscore_layer": bs["layer"]})
        if "per_example_f1" in bs:
            per_example["bertscore_f1"] = bs["per_example_f1"]
    if cfg.meteor:
        met = M.meteor(preds, refs)
        if "skipped" in met:
            out["meteor_skipped"] = met["skipped"]
            log.warning("METEOR skipped (n/a in the report): %s", met["skipped"])
        else:
            out["meteor"] = met["meteor"]
            if "per_example" in met:
                per_example["meteor"] = met["per_example"]
    out[PER_EXAMPLE_KEY] = per_example
    given = [r["prompt"] for r in rows if r.get("prompt") is not None]
    if given:
        K = K or max((p for p in given if p >= 0), default=-1) + 1
        routed = [r for r in rows if _in_range(r, K)]
        outside = len(given) - len(routed)
        if outside:
            out["selection_out_of_range"] = outside
            log.warning("%d row(s) have a prompt index outside 0..K-1 (K=%d); they are left out of the selection "
                        "histogram (selection_out_of_range in metrics.json)", outside, K)
        if len(given) < len(rows):
            out["selection_missing"] = len(rows) - len(given)
        if routed:
            out["selection"] = M.selection_stats([r["prompt"] for r in routed], K)
            out.update(reference_routing(routed, K))
            styles = sorted({r["style"] for r in routed if r.get("style")})
            if styles:
                out["selection_by_style"] = {s: [sum(1 for r in routed if r.get("style") == s and r["prompt"] == k)
                                                 for k in range(K)] for s in styles}
    return out


def _in_range(row: dict, K: int) -> bool:
    return row.get("prompt") is not None and 0 <= row["prompt"] < K


def reference_routing(rows: list[dict], K: int | None = None) -> dict:
    """How good the retriever's picks were on these references: the loss (nats/token) under the selected
    prompt, the mean over prompts and the best prompt per example (oracle), and how often the pick
    was that best prompt (select_acc). Needs ``ref_nll_by_prompt`` (written by spt generate for SPT) with
    one entry per prompt (K of them when ``K`` is given) and the pick among them."""
    scored = [r for r in rows if r.get("ref_nll_by_prompt") and r.get("ref_nll") is not None
              and (K is None or len(r["ref_nll_by_prompt"]) == K) and _in_range(r, len(r["ref_nll_by_prompt"]))]
    tokens = sum(r["ref_tokens"] for r in scored)
    if not scored or not tokens:
        return {}
    by = [r["ref_nll_by_prompt"] for r in scored]
    return {"ref_loss_selected": sum(r["ref_nll"] for r in scored) / tokens,
            "ref_loss_mean_prompt": sum(sum(b) / len(b) for b in by) / tokens,
            "ref_loss_oracle": sum(min(b) for b in by) / tokens,
            "select_acc": sum(r["prompt"] == b.index(min(b)) for r, b in zip(scored, by, strict=True)) / len(scored)}


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v))


def _cell(m: dict, key: str, boot=None, run: str = "") -> str:
    """A table cell: the value (n/a for a metric that was skipped), with its confidence interval when
    ``boot`` (a :class:`spt.bootstrap.Bootstrap`) has one, or [n/a] when it could not resample it."""
    if key not in m and SKIPPED.get(key) in m:
        return "n/a"
    text = _fmt(m.get(key))
    if boot is None or key in NOT_QUALITY or not isinstance(m.get(key), float):
        return text
    ci = boot.intervals.get(run, {}).get(key)
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{text} [n/a]"


def metrics_table(named: list[tuple[str, dict]], boot=None) -> str:
    """Runs side by side in the paper's layout; with ``boot``, each metric with its bootstrap interval."""
    cols = [(k, t) for k, t in TABLE if any(k in m or SKIPPED.get(k) in m for _, m in named)]
    lines = ["| run | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in named:
        lines.append(f"| {name} | " + " | ".join(_cell(m, k, boot, name) for k, _ in cols) + " |")
    return "\n".join(lines)


def selection_plot(hist: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(hist)), hist, color="#4C72B0")
    ax.set_xticks(range(len(hist)))
    ax.set_xlabel("soft prompt")
    ax.set_ylabel("examples")
    ax.set_title(title)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def _savefig(fig, path: Path) -> None:
    """Save a PNG through a temporary sibling renamed into place (no partial image if interrupted)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOSS_NAMES = {"llm": "LM loss", "sel": "selection loss", "fus": "fusion loss", "ctr": "contrastive loss",
              "bal": "load-balance loss"}


def loss_figure(metrics_csv: Path, title: str = "Training"):
    """Left: the LM loss, training and validation (nats per token), the one that says whether the model
    learns; right: the auxiliary losses (selection, fusion, ...) on their own scale. None if nothing logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .logger import read_metrics

    series = read_metrics(metrics_csv)
    lm = series.get(("train", "llm")) or series.get(("train", "loss"))
    valid = series.get(("valid", "loss"))
    aux = {name: pts for (split, name), pts in series.items() if split == "train" and name in LOSS_NAMES
           and name != "llm" and any(v for _, v in pts)}
    if not lm and not valid:
        return None
    fig, axes = plt.subplots(1, 2 if aux else 1, figsize=(10 if aux else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    if lm:
        ax.plot([s for s, _ in lm], [v for _, v in lm], lw=1, alpha=0.8, label="training batches")
    if valid:
        ax.plot([s for s, _ in valid], [v for _, v in valid], "k-o", ms=3, label="validation set")
    ax.set_title("LM loss of the reference replies")
    ax.set_ylabel("nats per token")
    if aux:
        ax2 = axes[0][1]
        for name, pts in sorted(aux.items()):
            ax2.plot([s for s, _ in pts], [v for _, v in pts], lw=1, label=LOSS_NAMES[name])
        ax2.set_title("Auxiliary losses (training batches)")
        ax2.set_ylabel("loss")
    for a in axes[0]:
        a.set_xlabel("optimizer step")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.legend(fontsize=7, loc="best", framealpha=0.8)
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_plot(metrics_csv: Path, path: Path, title: str = "Training") -> bool:
    """Save :func:`loss_figure` to ``path``; False if the log has nothing to plot."""
    import matplotlib.pyplot as plt

    fig = loss_figure(metrics_csv, title)
    if fig is None:
        return False
    _savefig(fig, path)
    plt.close(fig)
    return True


def routing_plot(metrics_csv: Path, path: Path) -> bool:
    """Validation routing over training: each prompt's share of the selections, and select_acc (how often
    the retriever picked the prompt with the lowest loss); False when the run logged no routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .logger import read_metrics

    series = read_metrics(metrics_csv)
    shares = sorted((name, pts) for (split, name), pts in series.items() if split == "valid"
                    and name.startswith("sel_share_"))
    if not shares:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in shares:
        ax.plot([s for s, _ in pts], [v for _, v in pts], "-o", ms=3, label=f"prompt {name.rsplit('_', 1)[1]}")
    acc = series.get(("valid", "select_acc"))
    if acc:
        ax.plot([s for s, _ in acc], [v for _, v in acc], "k--", label="select_acc")
    ax.axhline(M.COLLAPSE_SHARE, color="red", lw=0.8, ls=":", label="collapse warning")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of validation examples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return True


def json_safe(obj: Any, where: str = "metrics") -> Any:
    """``obj`` with every non-finite float replaced by None (warned about, naming the key): NaN and
    Infinity are not JSON, and ``json.dumps`` would write them as bare ``NaN``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        log.warning("%s is %s; written as null", where, obj)
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling renamed into place: never a partial or a temp file left."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics_json(path: Path, metrics: dict) -> None:
    """metrics.json: strict JSON (non-finite values become null; ``allow_nan=False`` makes sure), atomically."""
    metrics = {k: v for k, v in metrics.items() if k != PER_EXAMPLE_KEY}
    write_text_atomic(path, json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")


def provenance_lines(info: dict | None) -> list[str]:
    """How the evaluated predictions were made, for report.md (from spt generate's provenance file)."""
    if not isinstance(info, dict) or "checkpoint" not in info:
        return ["*Provenance unknown: these predictions have no provenance file (not made by spt generate).*", ""]
    gen = info.get("generation") or {}
    decoding = ", ".join(f"{k}={gen[k]}" for k in ("num_beams", "do_sample", "temperature", "top_p",
                                                     "no_repeat_ngram_size", "max_new_tokens", "seed") if k in gen)
    return ["Made by spt " + str(info.get("spt_version")) + f" on {info.get('created')}: checkpoint "
            f"`{info['checkpoint']}` ({info.get('method')}, {info.get('trained_steps')} steps, base model "
            f"`{info.get('base_model')}`), data `{info.get('data')}` (sha256 {str(info.get('data_sha256'))[:12]}, "
            f"{info.get('examples')} examples), decoding {decoding}.", ""]


def write_report(out_dir: Path, name: str, metrics: dict, rows: list[dict], run_dir: Path | None,
                 samples: int = 10) -> Path:
    """Plots, report.md, per_example.jsonl (what bootstrap intervals resample, see :mod:`spt.bootstrap`) and
    metrics.json in ``out_dir``; metrics.json last, since its presence marks a finished evaluation (spt
    experiment skips arms that have it)."""
    from .bootstrap import PER_EXAMPLE_FILE, per_example_rows

    out_dir.mkdir(parents=True, exist_ok=True)
    cached = metrics.pop(PER_EXAMPLE_KEY, None) or {}
    write_text_atomic(out_dir / PER_EXAMPLE_FILE, "".join(
        json.dumps(json_safe(r, PER_EXAMPLE_FILE), ensure_ascii=False, allow_nan=False) + "\n"
        for r in per_example_rows(rows, cached)))
    md = [f"# Evaluation: {name}", "", f"{metrics['n']} examples.", "", metrics_table([(name, metrics)]), ""]
    md += provenance_lines(metrics.get("provenance"))
    if "ppl_unscored" in metrics:
        md += [f"PPL is over {metrics['n'] - metrics['ppl_unscored']} of the {metrics['n']} references: "
               f"{metrics['ppl_unscored']} were not scored (no ref_nll: longer than data.max_length).", ""]
    if "selection_out_of_range" in metrics:
        md += [f"**{metrics['selection_out_of_range']} row(s) name a prompt outside the run's prompts; they are "
               "left out of the selection histogram.**", ""]
    extra = {k: metrics[k] for k in ("f1_unnormalized", "bleu1", "bleu2", "bleu3", "bleu4", "bertscore_p",
                                     "bertscore_r", "avg_len") if k in metrics}
    md += ["More: " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()), ""]
    for key in ("bertscore_skipped", "meteor_skipped"):
        if key in metrics:
            md += [f"*{key.split('_')[0]}: skipped — {metrics[key]}*", ""]
    if "bertscore_model" in metrics:
        md += [f"BERTScore model: `{metrics['bertscore_model']}`, layer {metrics['bertscore_layer']} "
               "(not comparable to scores from another model).", ""]
    if "selection" in metrics:
        sel = metrics["selection"]
        selection_plot(sel["histogram"], out_dir / "selection.png", f"{name}: prompt selection")
        md += ["## Prompt selection", "", f"Histogram over prompts: {sel['histogram']}; entropy "
               f"{sel['entropy']:.3f} nats ({sel['entropy_normalized']:.2f} of the maximum).", ""]
        top = max(sel["histogram"]) / max(1, sum(sel["histogram"]))
        if top > M.COLLAPSE_SHARE:
            md += [f"**Routing collapse: one prompt takes {100 * top:.0f}% of the selections.**", ""]
        if "select_acc" in metrics:
            md += [f"Reference loss (nats/token) under the selected prompt {metrics['ref_loss_selected']:.4f}, "
                   f"the mean over prompts {metrics['ref_loss_mean_prompt']:.4f}, the best prompt per example "
                   f"(oracle) {metrics['ref_loss_oracle']:.4f}; the retriever picked the best prompt for "
                   f"{100 * metrics['select_acc']:.1f}% of the examples (chance {100 / len(sel['histogram']):.0f}%).",
                   ""]
        md += ["![selection](selection.png)", ""]
        if "selection_by_style" in metrics:
            K = len(sel["histogram"])
            md += ["| style | " + " | ".join(f"prompt {k}" for k in range(K)) + " |", "|---|" + "---:|" * K]
            md += [f"| {s} | " + " | ".join(map(str, c)) + " |" for s, c in metrics["selection_by_style"].items()]
            md += [""]
        md += _per_prompt_examples([r for r in rows if _in_range(r, len(sel["histogram"]))])
    csv_path = run_dir / "metrics.csv" if run_dir is not None else None
    if csv_path is not None and csv_path.is_file() and loss_plot(csv_path, out_dir / "loss_curves.png",
                                                                 f"Training of {name}"):
        md += ["## Training", "", "![loss curves](loss_curves.png)", ""]
        if routing_plot(csv_path, out_dir / "routing.png"):
            md += ["Routing on the validation set during training (share of each prompt, select_acc):", "",
                   "![routing](routing.png)", ""]
    md += ["## Samples", ""]
    for r in rows[:samples]:
        md += [f"- **persona**: {' '.join(r.get('persona') or [])}",
               f"  - **context**: {' / '.join((r.get('context') or [])[-3:])}",
               f"  - **reference**: {r['reference']}",
               f"  - **prediction**{_prompt_tag(r)}: {r['prediction'] or '(empty)'}"]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(md) + "\n")
    write_metrics_json(out_dir / "metrics.json", metrics)
    return path


def _prompt_tag(r: dict) -> str:
    return f" (prompt {r['prompt']})" if r.get("prompt") is not None else ""


def _per_prompt_examples(rows: list[dict], per_prompt: int = 2) -> list[str]:
    out = ["Examples routed to each prompt:", ""]
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    for k in sorted(by_prompt):
        for r in by_prompt[k][:per_prompt]:
            out.append(f"- prompt {k}: *{' '.join(r.get('persona') or [])[:90]}* → {r['prediction'][:80]}")
    return [*out, ""]


def evaluated_on(metrics: dict) -> tuple:
    """What a run was evaluated on: the data file's hash (from the provenance) and the example count."""
    info = metrics.get("provenance") if isinstance(metrics.get("provenance"), dict) else {}
    return info.get("data_sha256"), metrics.get("n")


def comparability_warning(named: list[tuple[str, dict]]) -> str | None:
    """A sentence when the runs were not evaluated on the same examples (so their numbers do not compare)."""
    seen = {name: evaluated_on(m) for name, m in named}
    counts = {n for _, n in seen.values()}
    hashes = {h for h, _ in seen.values() if h is not None}
    unknown = [name for name, (h, _) in seen.items() if h is None]
    if len(counts) > 1 or len(hashes) > 1:
        what = ", ".join(f"{name}: n={n}" + (f" on data {h[:8]}" if h else "") for name, (h, n) in seen.items())
        return f"Not like with like: these runs were evaluated on different examples ({what}); their differences " \
               "mix the models with the data."
    if unknown and len(named) > 1:
        return f"Unchecked: {', '.join(unknown)} carry no provenance, so it is unknown whether all runs were " \
               "evaluated on the same data (rerun spt generate and spt eval)."
    return None


def compare(named: list[tuple[str, dict]], examples: list | None = None, resamples: int = 1000,
            seed: int = 0) -> str:
    """Runs side by side (Markdown); see :func:`compare_runs`."""
    return compare_runs(named, examples, resamples, seed)[0]


def compare_runs(named: list[tuple[str, dict]], examples: list | None = None, resamples: int = 1000,
                 seed: int = 0) -> tuple[str, Any]:
    """Runs side by side, and each run's difference from the first; returns (Markdown, the bootstrap).

    ``examples[i]`` is run i's per-example data (:func:`spt.bootstrap.load_per_example`: a PerExample, or
    why there is none). With them (and ``resamples`` >= 1) every metric gets a bootstrap confidence interval,
    and every difference from the first run a paired test where both were evaluated on the same examples:
    ``~`` marks a difference within noise (its 95% interval contains 0). Without them the values stand alone,
    and the table says so. The bootstrap is None then."""
    from .bootstrap import bootstrap

    if len(named) < 1:
        raise ValueError("nothing to compare")
    if resamples < 0:
        raise ValueError(f"--bootstrap must be a number of resamples >= 0, got {resamples}")
    boot = bootstrap(named, examples, resamples, seed) if examples is not None and resamples > 0 else None
    warning = comparability_warning(named)
    md = []
    if warning:
        log.warning("%s", warning)
        md += [f"**{warning}**", ""]
    md += [metrics_table(named, boot), ""]
    if boot is not None:
        md += [f"In brackets: {100 * boot.level:.0f}% bootstrap confidence interval ({boot.resamples} resamples of "
               f"the evaluated examples, seed {boot.seed}; BLEU and DIST recomputed on each resample, PPL pooled "
               "from the resampled references' NLLs, the other metrics averaged over the resampled examples)."]
        missing = [f"{run}: " + "; ".join(sorted({why for why in reasons.values()}))
                   for run, reasons in boot.no_interval.items()]
        if missing:
            md += ["[n/a]: no interval, since there is nothing to resample (" + " — ".join(missing) + ")."]
        md += [""]
    else:
        md += ["*No confidence intervals: " + ("the bootstrap is off (--bootstrap 0)." if examples is not None
               else "no per-example data was given.") + " Differences below may be noise.*", ""]
    if len(named) > 1:
        md += _differences(named, boot)
    return "\n".join(md), boot


def _differences(named: list[tuple[str, dict]], boot) -> list[str]:
    """The difference table (each run minus the first) with the paired test's interval, verdict and p."""
    base_name, base = named[0]
    cols = [(k, t) for k, t in TABLE if k not in NOT_QUALITY and all(isinstance(m.get(k), float) for _, m in named)]
    paired = boot is not None and any(boot.diffs.values())
    head = " | better | worse | within noise" if paired else ""
    md = [f"Difference from {base_name} (run − {base_name}; for PPL lower is better)"
          + (", paired bootstrap on the same resampled examples:" if paired else ":"), "",
          "| run | " + " | ".join(t for _, t in cols) + head + " | AVG rel. % |",
          "|---|" + "---:|" * (len(cols) + (3 if paired else 0) + 1)]
    p_rows, untested = [], []
    for name, m in named[1:]:
        tests = boot.diffs.get(name, {}) if boot is not None else {}
        cells, rel = [], []
        for k, _ in cols:
            diff = m[k] - base[k]
            change = 100 * diff / abs(base[k]) if base[k] else 0.0
            rel.append(-change if k in LOWER_IS_BETTER else change)
            t = tests.get(k)
            cells.append(f"{diff:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}]" + (" ~" if t["within_noise"] else "")
                         if t else f"{diff:+.2f}")
        avg = sum(rel) / len(rel) if rel else 0.0
        counts = ""
        if paired:
            verdicts = [t["verdict"] for t in tests.values() if t]
            counts = " | " + " | ".join(str(verdicts.count(v)) if tests else "–"
                                        for v in ("better", "worse", "within noise"))
        md.append(f"| {name} | " + " | ".join(cells) + counts + f" | {avg:+.1f} |")
        if tests:
            p_rows.append(f"| {name} | " + " | ".join(_p(tests[k]["p"]) if k in tests else "–" for k, _ in cols) + " |")
        elif boot is not None:
            untested.append(f"{name}: {boot.unpaired.get(name, 'no per-example data')}")
    md += [""]
    if paired:
        md += ["`[lo, hi]`: 95% interval of the difference over the paired resamples. `~` within noise: the "
               "interval contains 0, so these runs do not differ beyond what resampling the examples gives. "
               "better / worse: how many metrics differ beyond noise, in the metric's good or bad direction."]
    if untested:
        md += ["Not tested (no interval of the difference): " + "; ".join(untested) + "."]
    md += ["AVG rel. %: the paper's average of the per-metric relative changes. It ignores noise and each "
           "metric's scale (a BLEU move from 0.73 to 0.90 counts +24%), so read the differences and their "
           "intervals first.", ""]
    if p_rows:
        md += ["p (two-sided): twice the share of resamples in which the difference has the other sign "
               "(< 0.05 where the interval excludes 0, up to resampling error):", "",
               "| run | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---:|" * len(cols), *p_rows, ""]
    return md


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def load_run_metrics(path: str | Path) -> tuple[str, dict]:
    path = Path(path)
    for cand in (path / "eval" / "metrics.json", path / "metrics.json", path):
        if cand.is_file() and cand.suffix == ".json":
            return (path.name if cand != path else path.stem), json.loads(cand.read_text())
    raise FileNotFoundError(f"{path}: no eval/metrics.json (run spt eval on it first)")


def _yerr(named: list[tuple[str, dict]], keys: list[str], boot) -> list | None:
    """Asymmetric error bars (below, above) of each bar from the bootstrap intervals; NaN where none."""
    if boot is None:
        return None
    out = []
    for name, m in named:
        low, high = [], []
        for k in keys:
            ci = boot.intervals.get(name, {}).get(k)
            low.append(max(0.0, m[k] - ci[0]) if ci else float("nan"))
            high.append(max(0.0, ci[1] - m[k]) if ci else float("nan"))
        out.append([low, high])
    return out


def load_runs(paths: list[str | Path]) -> tuple[list[tuple[str, dict]], list]:
    """Each evaluated run's (name, metrics.json) and its per-example data (or why there is none), for
    :func:`compare_runs`."""
    from .bootstrap import load_per_example

    named = [load_run_metrics(p) for p in paths]
    return named, [load_per_example(p, m) for p, (_, m) in zip(paths, named, strict=True)]


def _label_bars(ax, bars, labels: list[str], above: list[float] | None) -> None:
    """Each bar's value, vertical: inside a tall bar, or above a short one's error bar (``above``: how far
    each error bar reaches above its bar; NaN or None: no error bar)."""
    tops = [bar.get_height() + (a if above and not math.isnan(a := above[i]) else 0.0) for i, bar in enumerate(bars)]
    high = max([*tops, 1e-9])
    ax.set_ylim(top=max(ax.get_ylim()[1], high * 1.2))  # room for the labels and a one-row legend
    for bar, text, top in zip(bars, labels, tops, strict=True):
        x, h = bar.get_x() + bar.get_width() / 2, bar.get_height()
        if h > 0.2 * high:
            ax.text(x, h / 2, text, rotation=90, ha="center", va="center", fontsize=6)
        else:
            ax.text(x, top + 0.01 * high, text, rotation=90, ha="center", va="bottom", fontsize=6)


def comparison_figure(named: list[tuple[str, dict]], title: str = "Comparison", boot=None):
    """Left: the quality metrics (higher is better), one group per metric and one bar per run, each
    labelled with its value; right: perplexity (lower is better). With ``boot`` (a
    :class:`spt.bootstrap.Bootstrap`) every bar carries its bootstrap confidence interval as an error bar,
    and a metric on which a run's difference from the first run is within noise is labelled with ``~``.
    None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(k, t) for k, t in TABLE if k not in NOT_QUALITY | LOWER_IS_BETTER
            and all(isinstance(m.get(k), float) for _, m in named)]
    ppl = [(name, m) for name, m in named if isinstance(m.get("ppl"), float)]
    if not cols and not ppl:
        return None

    def label(name: str, key: str, value: float, fmt: str) -> str:
        test = boot.diffs.get(name, {}).get(key) if boot is not None else None
        return fmt % value + ("~" if test and test["within_noise"] else "")

    panels = [p for p in (cols, ppl) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * len(cols) + 4, 4.4),
                             gridspec_kw={"width_ratios": [max(1, len(cols)), 1.5][:len(panels)]}, squeeze=False)
    ax = axes[0][0]
    if cols:
        width = 0.8 / len(named)
        errs = _yerr(named, [k for k, _ in cols], boot)
        for i, (name, m) in enumerate(named):
            bars = ax.bar([j + i * width for j in range(len(cols))], [m[k] for k, _ in cols], width, label=name,
                          yerr=errs[i] if errs else None, capsize=2, error_kw={"elinewidth": 0.8})
            _label_bars(ax, bars, [label(name, k, m[k], "%.1f") for k, _ in cols], errs[i][1] if errs else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
        ax.set_xticklabels([t for _, t in cols], fontsize=8)
        ax.set_ylabel("score (0-100)")
        ax.set_title("Quality (higher is better)")
        ax.legend(fontsize=7, loc="upper left", ncol=min(len(named), 6), framealpha=0.9)
        ax.grid(axis="y", alpha=0.3)
    if ppl:
        axp = axes[0][-1]
        errs = _yerr(ppl, ["ppl"], boot)
        yerr = [[e[0][0] for e in errs], [e[1][0] for e in errs]] if errs else None
        bars = axp.bar(range(len(ppl)), [m["ppl"] for _, m in ppl], color=[f"C{i}" for i in range(len(ppl))],
                       yerr=yerr, capsize=3, error_kw={"elinewidth": 0.8})
        _label_bars(axp, bars, [label(n, "ppl", m["ppl"], "%.2f") for n, m in ppl], yerr[1] if yerr else None)
        axp.set_xticks(range(len(ppl)))
        axp.set_xticklabels([n for n, _ in ppl], fontsize=7, rotation=30, ha="right")
        axp.set_ylabel("perplexity of the references")
        axp.set_title("PPL (lower is better)")
    fig.suptitle(title)
    if boot is not None:
        fig.text(0.01, 0.01, f"Error bars: {100 * boot.level:.0f}% bootstrap confidence intervals ({boot.resamples} "
                 f"resamples of the evaluated examples). ~ after a value: its difference from {boot.base} is "
                 "within noise (paired bootstrap).", fontsize=7, ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    return fig


def comparison_plot(named: list[tuple[str, dict]], path: Path, title: str = "Comparison", boot=None) -> None:
    """Save :func:`comparison_figure` to ``path`` (nothing when there is nothing to plot)."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(named, title, boot)
    if fig is None:
        return
    _savefig(fig, path)
    plt.close(fig)
