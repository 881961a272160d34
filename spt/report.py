"""Evaluation reports people can read: metrics.json, a Markdown report and PNG plots; run comparison."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import metrics as M
from .config import EvalConfig

log = logging.getLogger(__name__)

# (key in metrics.json, column title) in the layout of the paper's table
TABLE = [("f1", "F1"), ("bleu", "BLEU"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
         ("bertscore_f1", "BERTScore"), ("dist1", "DIST-1"), ("dist2", "DIST-2"), ("meteor", "METEOR"),
         ("ppl", "PPL"), ("train_min", "train min")]
LOWER_IS_BETTER = {"ppl"}
NOT_QUALITY = {"train_min"}  # shown in tables, left out of relative change and AVG


def read_predictions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file (run spt generate first)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    for i, r in enumerate(rows, 1):
        for key in ("prediction", "reference"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{path}:{i}: field {key!r} missing or not a string")
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def compute_metrics(rows: list[dict], cfg: EvalConfig, K: int | None = None) -> dict:
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    out: dict = {"n": len(rows), **M.text_metrics(preds, refs)}
    if all(r.get("ref_nll") is not None for r in rows):
        out["ppl"] = M.perplexity([r["ref_nll"] for r in rows], [r["ref_tokens"] for r in rows])
    bs = M.bertscore(preds, refs, cfg.bertscore_model, cfg.bertscore_layers)
    if "skipped" in bs:
        out["bertscore_skipped"] = bs["skipped"]
        log.warning("BERTScore skipped: %s", bs["skipped"])
    else:
        out.update({"bertscore_p": bs["precision"], "bertscore_r": bs["recall"], "bertscore_f1": bs["f1"],
                    "bertscore_model": bs["model"], "bertscore_layer": bs["layer"]})
    if cfg.meteor:
        met = M.meteor(preds, refs)
        if "skipped" in met:
            out["meteor_skipped"] = met["skipped"]
            log.warning("METEOR skipped: %s", met["skipped"])
        else:
            out["meteor"] = met["meteor"]
    selected = [r["prompt"] for r in rows if r.get("prompt") is not None]
    if selected:
        K = K or max(selected) + 1
        out["selection"] = M.selection_stats(selected, K)
        out.update(reference_routing(rows))
        styles = sorted({r["style"] for r in rows if r.get("style")})
        if styles:
            out["selection_by_style"] = {s: [sum(1 for r in rows if r.get("style") == s and r["prompt"] == k)
                                             for k in range(K)] for s in styles}
    return out


def reference_routing(rows: list[dict]) -> dict:
    """How good the retriever's picks were on these references: the loss (nats/token) under the selected
    prompt, the mean over prompts and the best prompt per example (oracle), and how often the pick
    was that best prompt (select_acc). Needs ``ref_nll_by_prompt`` (written by spt generate for SPT)."""
    scored = [r for r in rows if r.get("ref_nll_by_prompt") and r.get("prompt") is not None]
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


def metrics_table(named: list[tuple[str, dict]]) -> str:
    cols = [(k, t) for k, t in TABLE if any(k in m for _, m in named)]
    lines = ["| run | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in named:
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k, _ in cols) + " |")
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_plot(metrics_csv: Path, path: Path) -> bool:
    """Training-loss components and validation loss over steps; False if the log has nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .logger import read_metrics

    series = read_metrics(metrics_csv)
    train = {name: v for (split, name), v in series.items() if split == "train" and name in
             ("loss", "llm", "sel", "fus", "ctr")}
    valid = series.get(("valid", "loss"))
    if not train and not valid:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in sorted(train.items()):
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"train {name}", lw=1)
    if valid:
        ax.plot([s for s, _ in valid], [v for _, v in valid], "k-o", label="valid loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: Path, name: str, metrics: dict, rows: list[dict], run_dir: Path | None,
                 samples: int = 10) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = [f"# Evaluation: {name}", "", f"{metrics['n']} examples.", "", metrics_table([(name, metrics)]), ""]
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
        md += _per_prompt_examples(rows)
    csv_path = run_dir / "metrics.csv" if run_dir is not None else None
    if csv_path is not None and csv_path.is_file() and loss_plot(csv_path, out_dir / "loss_curves.png"):
        md += ["## Training", "", "![loss curves](loss_curves.png)", ""]
        if routing_plot(csv_path, out_dir / "routing.png"):
            md += ["Routing on the validation set during training (share of each prompt, select_acc):", "",
                   "![routing](routing.png)", ""]
    md += ["## Samples", ""]
    for r in rows[:samples]:
        md += [f"- **persona**: {' '.join(r.get('persona', []))}",
               f"  - **context**: {' / '.join(r.get('context', [])[-3:])}",
               f"  - **reference**: {r['reference']}",
               f"  - **prediction**{_prompt_tag(r)}: {r['prediction'] or '(empty)'}"]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
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
            out.append(f"- prompt {k}: *{' '.join(r.get('persona', []))[:90]}* → {r['prediction'][:80]}")
    return [*out, ""]


def compare(named: list[tuple[str, dict]]) -> str:
    """Runs side by side; then each run's relative change (%) from the first run, and their average (AVG)."""
    if len(named) < 1:
        raise ValueError("nothing to compare")
    table = metrics_table(named)
    base_name, base = named[0]
    cols = [(k, t) for k, t in TABLE if k not in NOT_QUALITY and all(isinstance(m.get(k), float) for _, m in named)]
    lines = ["", f"Relative change from {base_name} (%; for PPL a decrease counts as a gain):", "",
             "| run | " + " | ".join(t for _, t in cols) + " | AVG |", "|---|" + "---:|" * (len(cols) + 1)]
    for name, m in named[1:]:
        rel = []
        for k, _ in cols:
            change = 100 * (m[k] - base[k]) / abs(base[k]) if base[k] else 0.0
            rel.append(-change if k in LOWER_IS_BETTER else change)
        avg = sum(rel) / len(rel) if rel else 0.0
        lines.append(f"| {name} | " + " | ".join(f"{v:+.1f}" for v in rel) + f" | {avg:+.1f} |")
    return table + ("\n" + "\n".join(lines) if len(named) > 1 else "") + "\n"


def load_run_metrics(path: str | Path) -> tuple[str, dict]:
    path = Path(path)
    for cand in (path / "eval" / "metrics.json", path / "metrics.json", path):
        if cand.is_file() and cand.suffix == ".json":
            return (path.name if cand != path else path.stem), json.loads(cand.read_text())
    raise FileNotFoundError(f"{path}: no eval/metrics.json (run spt eval on it first)")


def comparison_plot(named: list[tuple[str, dict]], path: Path) -> None:
    """Grouped bars of the quality metrics, one group per metric and one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(k, t) for k, t in TABLE if k not in NOT_QUALITY | LOWER_IS_BETTER
            and all(isinstance(m.get(k), float) for _, m in named)]
    if not cols:
        return
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 3.5))
    width = 0.8 / len(named)
    for i, (name, m) in enumerate(named):
        ax.bar([j + i * width for j in range(len(cols))], [m[k] for k, _ in cols], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
    ax.set_xticklabels([t for _, t in cols], fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
