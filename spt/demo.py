"""``spt demo``: the whole method offline on one machine, from nothing, in a setting where selection matters.

1. Two synthetic persona-chat corpora. The *base* corpus gives every speaker a speaking style (terse,
   enthusiastic, formal, casual) drawn independently of its persona; the *tuning* corpus lets the
   persona decide the style (most of a speaker's facts come from topics that favour one style).
2. A small base LM trained from scratch on the base corpus (``finetune``, ``model.init: scratch``),
   with the responder's earlier turns in its context: it can speak every style and keeps the style
   it sees, but has never seen which personas take which style. Reused by later runs.
3. PT (one prompt) and SPT (K=4 prompts + retriever) tuned on the frozen base LM with the newest
   partner turn as the only context, so the style must come from the persona: one prompt has to
   serve four styles, while SPT can route each persona to a prompt of its own style.
4. A report: the metrics with bootstrap confidence intervals and SPT - PT with a paired test (see
   :mod:`spt.bootstrap`), the style x prompt matrix, per-style metrics, samples where SPT and PT differ,
   loss and routing curves. The numbers come from these runs, whichever way they fall.

``--quick`` is a smoke test of the same stages on 16 examples (about a minute on 2 CPU cores); its numbers
mean nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import metrics as M
from .bootstrap import load_per_example
from .data import split_by_dialogue, write_jsonl
from .data.synth import STYLES, synth_examples
from .experiment import Arm, Experiment, run_experiment
from .report import compare, load_run_metrics, read_predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    dialogues: int  # tuning corpus
    base_dialogues: int  # base-LM corpus
    base_layers: int
    base_width: int
    base_vocab: int
    base_steps: int
    prompt_steps: int
    eval_examples: int
    batch_size: int


FULL = DemoSize(dialogues=1500, base_dialogues=3000, base_layers=4, base_width=128, base_vocab=1024,
                base_steps=400, prompt_steps=700, eval_examples=300, batch_size=16)
QUICK = DemoSize(dialogues=120, base_dialogues=120, base_layers=1, base_width=32, base_vocab=300, base_steps=20,
                 prompt_steps=6, eval_examples=16, batch_size=8)
CONTEXT_TURNS = 1  # tuning: the partner's newest turn only: the responder's earlier turns would reveal its style
# The base LM sees the responder's earlier turns, so it learns to keep a style it sees in its context: the
# pathway through which a soft prompt can set the style. (Trained without any such evidence, the base LM
# would have no input that moves its choice of style, and no prompt could steer it.)
BASE_CONTEXT_TURNS = 2  # the responder's previous turn and the partner's newest


def _overrides(size: DemoSize, data: dict[str, str]) -> dict:
    return {
        **{f"data.{k}": v for k, v in data.items()}, "data.max_length": 256,
        "data.max_context_turns": CONTEXT_TURNS, "data.max_valid_examples": min(200, 2 * size.eval_examples),
        "train.batch_size": size.batch_size, "train.eval_every": max(1, size.prompt_steps // 4),
        "train.log_every": 5, "generate.max_new_tokens": 32, "generate.batch_size": 32,
        # fp32: at width 128 bf16 autocast costs more than it saves (base LM: 0.63 vs 0.37 s/step here)
        "train.mixed_precision": "no",
    }


def _arms(size: DemoSize, base_files: dict[str, str]) -> list[Arm]:
    base = {"method": "finetune", "model.init": "scratch", "baseline.loss_on": "all",
            "data.train": base_files["train"], "data.valid": base_files["valid"],
            "data.max_context_turns": BASE_CONTEXT_TURNS,
            "model.scratch.n_layer": size.base_layers, "model.scratch.n_embd": size.base_width,
            "model.scratch.n_head": 4, "model.scratch.vocab_size": size.base_vocab, "model.scratch.n_positions": 320,
            "train.lr": 3e-3, "train.warmup_steps": max(1, size.base_steps // 20), "train.scheduler": "cosine",
            "train.max_steps": size.base_steps, "train.eval_every": max(1, size.base_steps // 4),
            "train.batch_size": 32}
    prompts = {"train.lr": 3e-2, "train.max_steps": size.prompt_steps, "spt.num_virtual_tokens": 8,
               "train.warmup_steps": max(1, size.prompt_steps // 10)}
    return [Arm("base-lm", base, compare=False),
            Arm("pt", {**prompts, "method": "pt"}, base_model_from="base-lm"),
            Arm("spt", {**prompts, "method": "spt", "spt.K": 4}, base_model_from="base-lm")]


def write_demo_data(out: Path, size: DemoSize, seed: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """The base corpus (style independent of persona) and the tuning corpus (persona decides style),
    each split by dialogue; files are reused when present."""
    data_dir = out / "data"
    base = {name: data_dir / f"base-{name}.jsonl" for name in ("train", "valid")}
    tune = {name: data_dir / f"{name}.jsonl" for name in ("train", "valid", "test")}
    if not all(f.is_file() for f in [*base.values(), *tune.values()]):
        corpora = [(base, synth_examples(size.base_dialogues, seed=seed, style_consistency=0.0),
                    {"train": 0.9, "valid": 0.1}),
                   (tune, synth_examples(size.dialogues, seed=seed + 1, style_consistency=1.0, clear_majority=True),
                    {"train": 0.8, "valid": 0.1, "test": 0.1})]
        for files, examples, fractions in corpora:
            for name, part in split_by_dialogue(examples, fractions, seed).items():
                write_jsonl(part, files[name])
    return base, tune


def run_demo(out: Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run every stage (skipping finished ones) and write ``out/report.md``; returns the key numbers."""
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    start = time.time()
    base_files, files = write_demo_data(out, size, seed)
    stages["data"] = time.time() - start
    exp = Experiment(name="spt demo", output_dir=out, config=None,
                     overrides=_overrides(size, {k: str(v) for k, v in files.items()}),
                     arms=_arms(size, {k: str(v) for k, v in base_files.items()}),
                     generate={"limit": size.eval_examples, "data": str(files["test"])})
    run_experiment(exp, progress=progress)
    timings = json.loads((out / "timings.json").read_text())
    stages["base LM"] = timings.get("base-lm", {}).get("train_s", 0.0)
    for arm in ("pt", "spt"):
        t = timings.get(arm, {})
        stages[f"{arm.upper()} train"] = t.get("train_s", 0.0)
        stages[f"{arm.upper()} generate + eval"] = t.get("generate_s", 0.0) + t.get("eval_s", 0.0)
    return write_demo_report(out, stages, quick)


def _load(out: Path, arm: str) -> tuple[dict, list[dict]]:
    return load_run_metrics(out / arm)[1], read_predictions(out / arm / "predictions.jsonl")


def routing_accuracy(by_style: dict[str, list[int]]) -> float:
    """Share of examples whose prompt is their style's prompt under the best one-to-one style<->prompt
    matching (chance is about 1/number of styles; everything on one prompt scores that style's share)."""
    counts = list(by_style.values())
    total = sum(sum(c) for c in counts)
    if not total:
        return float("nan")
    K = len(counts[0])
    best = 0
    for perm in itertools.permutations(range(K), min(K, len(counts))):
        best = max(best, sum(counts[i][k] for i, k in enumerate(perm)))
    return best / total


def style_prompt_nmi(by_style: dict[str, list[int]]) -> float:
    """Normalised mutual information between latent style and selected prompt (0: unrelated, 1: one-to-one)."""
    counts = [c for c in by_style.values()]
    total = sum(sum(c) for c in counts)
    if not total:
        return float("nan")
    ps = [sum(c) / total for c in counts]
    pk = [sum(c[k] for c in counts) / total for k in range(len(counts[0]))]
    mi = sum(n / total * math.log((n / total) / (ps[i] * pk[k]))
             for i, c in enumerate(counts) for k, n in enumerate(c) if n)
    h = lambda p: -sum(x * math.log(x) for x in p if x)  # noqa: E731
    denom = math.sqrt(h(ps) * h(pk))
    return mi / denom if denom else 0.0


def per_style_table(pt_rows: list[dict], spt_rows: list[dict]) -> str:
    """F1, BLEU, DIST-2 and PPL of PT and SPT on each style's held-out examples."""
    lines = ["| style | n | PT F1 | SPT F1 | PT BLEU | SPT BLEU | PT DIST-2 | SPT DIST-2 | PT PPL | SPT PPL |",
             "|---|---:|" + "---:|" * 8]
    for style in sorted({r.get("style") for r in pt_rows if r.get("style")}):
        cells = []
        for rows in (pt_rows, spt_rows):
            part = [r for r in rows if r.get("style") == style]
            preds, refs = [r["prediction"] for r in part], [r["reference"] for r in part]
            ppl = M.perplexity([r["ref_nll"] for r in part], [r["ref_tokens"] for r in part]) \
                if all(r.get("ref_nll") is not None for r in part) else float("nan")
            cells.append((M.f1(preds, refs), M.bleu(preds, refs), M.distinct(preds, 2), ppl))
        row = [f"{cells[0][i]:.2f} | {cells[1][i]:.2f}" for i in range(4)]
        lines.append(f"| {style} | {sum(r.get('style') == style for r in pt_rows)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_demo_report(out: Path, stages: dict[str, float], quick: bool) -> dict:
    pt, pt_rows = _load(out, "pt")
    spt, spt_rows = _load(out, "spt")
    keys = [("f1", "F1"), ("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("bertscore_f1", "BERTScore"),
            ("meteor", "METEOR"), ("dist1", "DIST-1"), ("dist2", "DIST-2"), ("ppl", "PPL")]
    keys = [(k, t) for k, t in keys if isinstance(spt.get(k), float) and isinstance(pt.get(k), float)]
    better = [t for k, t in keys if (spt[k] < pt[k] if k == "ppl" else spt[k] > pt[k])]
    rel = [(pt[k] - spt[k] if k == "ppl" else spt[k] - pt[k]) / abs(pt[k]) * 100 for k, _ in keys if pt[k]]
    avg = sum(rel) / len(rel) if rel else 0.0
    verdict = (f"SPT beats PT on {len(better)} of {len(keys)} metrics ({', '.join(better) or 'none'}); "
               f"average relative change {avg:+.1f}%. "
               + ("" if len(better) > len(keys) / 2 and avg > 0 else "**On this run SPT does not beat PT overall.**"))
    by_style = spt.get("selection_by_style", {})
    routing, nmi = routing_accuracy(by_style), style_prompt_nmi(by_style)
    base_summary = json.loads((out / "base-lm" / "train_summary.json").read_text())
    lines = [
        "# spt demo" + (" (quick)" if quick else ""), "",
        "Synthetic persona chat → a base LM trained from scratch on dialogues whose speaking style is "
        "independent of the persona (it can speak every style, but never learned which personas take which) "
        "→ prompt tuning (PT, one prompt) vs selective prompt tuning (SPT, 4 prompts + retriever) on the "
        "frozen base LM, with tuning data where the persona decides the style and only the partner's newest "
        "turn as context. One prompt has to serve four styles; SPT can give each style its own prompt. "
        "Evaluated on held-out dialogues.", "",
        f"Base LM: valid loss {base_summary['history'][0]['loss']:.3f} → {base_summary['best_val_loss']:.3f} "
        f"after {base_summary['step']} steps.", "",
        "## Results", "", compare([("pt", pt), ("spt", spt)], [load_per_example(out / a, m) for a, m in
                                                              (("pt", pt), ("spt", spt))]), verdict, "",
        "## Does the retriever route styles to prompts?", "",
        f"Each held-out example has a latent speaking style ({', '.join(STYLES)}). Counts of the prompt SPT "
        f"selected, per style. Routing accuracy under the best one-to-one style↔prompt matching: "
        f"{routing:.2f} (chance ≈ {1 / max(1, len(by_style)):.2f}); normalised mutual information between "
        f"style and prompt: {nmi:.2f} (0 = unrelated, 1 = one prompt per style).", "",
    ]
    if by_style:
        K = len(next(iter(by_style.values())))
        lines += ["| style | " + " | ".join(f"prompt {k}" for k in range(K)) + " |", "|---|" + "---:|" * K]
        lines += [f"| {s} | " + " | ".join(map(str, c)) + " |" for s, c in by_style.items()]
    lines += ["", "## Per style", "", per_style_table(pt_rows, spt_rows), "",
              "## Samples where SPT and PT differ", ""]
    differ = [(a, b) for a, b in zip(pt_rows, spt_rows, strict=True) if a["prediction"] != b["prediction"]]
    lines += [f"{len(differ)} of {len(pt_rows)} held-out replies differ. One per style first:", ""]
    firsts = {a.get("style"): (a, b) for a, b in reversed(differ)}
    shown = list(firsts.values()) + [p for p in differ if p not in firsts.values()]
    for a, b in shown[:8]:
        lines += [f"- **persona** ({a.get('style', '?')}): {' '.join(a['persona'])}",
                  f"  - **partner**: {a['context'][-1] if a['context'] else ''}",
                  f"  - **reference**: {a['reference']}", f"  - **PT**: {a['prediction'] or '(empty)'}",
                  f"  - **SPT** (prompt {b['prompt']}): {b['prediction'] or '(empty)'}"]
    lines += ["", "## Loss curves", "", "Base LM: ![base](base-lm/eval/loss_curves.png)" if
              (out / "base-lm" / "eval" / "loss_curves.png").is_file() else "",
              "PT: ![pt](pt/eval/loss_curves.png)", "", "SPT: ![spt](spt/eval/loss_curves.png)", "",
              "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in stages.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    key = {"report": str(out / "report.md"), "verdict": verdict, "style_routing_accuracy": routing, "style_nmi": nmi,
           "pt": {k: pt[k] for k, _ in keys}, "spt": {k: spt[k] for k, _ in keys}, "stages_s": stages}
    (out / "demo_summary.json").write_text(json.dumps(key, indent=2))
    return key
