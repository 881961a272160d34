"""``spt demo``: the whole method offline on one machine, from nothing.

1. Generate the synthetic persona-chat corpus (personas with latent styles), split by dialogue.
2. Train a small base LM from scratch on the training dialogues (``finetune`` with ``model.init:
   scratch``), since no pretrained model can be downloaded. Reused by later runs in the same folder.
3. Train PT and SPT (K=4) on the frozen base LM, generate for the held-out split, evaluate both.
4. Write a comparison report: metrics, samples side by side, which prompt each style is routed
   to, loss curves. The numbers come from these runs, whichever way they fall.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .data import split_by_dialogue, write_jsonl
from .data.synth import STYLES, synth_examples
from .experiment import Arm, Experiment, run_experiment
from .report import compare, load_run_metrics, read_predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    dialogues: int
    base_layers: int
    base_width: int
    base_vocab: int
    base_steps: int
    prompt_steps: int
    eval_examples: int
    batch_size: int


FULL = DemoSize(dialogues=3000, base_layers=4, base_width=128, base_vocab=1024, base_steps=500, prompt_steps=250,
                eval_examples=300, batch_size=16)
QUICK = DemoSize(dialogues=120, base_layers=1, base_width=32, base_vocab=300, base_steps=20, prompt_steps=6,
                 eval_examples=16, batch_size=8)


def _overrides(size: DemoSize, data: dict[str, str]) -> dict:
    return {
        **{f"data.{k}": v for k, v in data.items()}, "data.max_length": 256, "data.max_context_turns": 4,
        "data.max_valid_examples": 4 * size.eval_examples, "train.batch_size": size.batch_size,
        "train.eval_every": max(1, size.prompt_steps // 3), "train.log_every": 5, "generate.max_new_tokens": 32,
        "generate.batch_size": 32, "eval.meteor": False,
    }


def _arms(size: DemoSize) -> list[Arm]:
    base = {"method": "finetune", "model.init": "scratch", "baseline.loss_on": "all",
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


def run_demo(out: Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run every stage (skipping finished ones) and write ``out/report.md``; returns the key numbers."""
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    start = time.time()
    data_dir = out / "data"
    files = {name: data_dir / f"{name}.jsonl" for name in ("train", "valid", "test")}
    if not all(f.is_file() for f in files.values()):
        examples = synth_examples(size.dialogues, seed=seed)
        for name, part in split_by_dialogue(examples, {"train": 0.8, "valid": 0.1, "test": 0.1}, seed).items():
            write_jsonl(part, files[name])
    stages["data"] = time.time() - start
    exp = Experiment(name="spt demo", output_dir=out, config=None,
                     overrides=_overrides(size, {k: str(v) for k, v in files.items()}),
                     arms=_arms(size), generate={"limit": size.eval_examples, "data": str(files["test"])})
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


def write_demo_report(out: Path, stages: dict[str, float], quick: bool) -> dict:
    pt, pt_rows = _load(out, "pt")
    spt, spt_rows = _load(out, "spt")
    keys = [("f1", "F1"), ("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("bertscore_f1", "BERTScore"),
            ("dist1", "DIST-1"), ("dist2", "DIST-2"), ("ppl", "PPL")]
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
        "Synthetic persona chat → a base LM trained from scratch → prompt tuning (PT, one prompt) vs "
        "selective prompt tuning (SPT, 4 prompts + retriever) on the frozen base LM, evaluated on held-out "
        "dialogues.", "",
        f"Base LM: valid loss {base_summary['history'][0]['loss']:.3f} → {base_summary['best_val_loss']:.3f} "
        f"after {base_summary['step']} steps.", "",
        "## Results", "", compare([("pt", pt), ("spt", spt)]), verdict, "",
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
    lines += ["", "## Samples side by side", ""]
    for a, b in list(zip(pt_rows, spt_rows, strict=True))[:8]:
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
