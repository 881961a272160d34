"""Noise in comparisons: bootstrap confidence intervals of each metric, and paired tests of differences.

``spt eval`` keeps each evaluated row's data in ``eval/per_example.jsonl``: the prediction and reference,
the reference's NLL and token count, and the per-example scores that need a model or WordNet (BERTScore F1,
METEOR), computed once there. A bootstrap resample draws n of the n examples with replacement, and every
metric is recomputed on it with the real metric functions of :mod:`spt.metrics`:

- BLEU from sacreBLEU's per-sentence statistics, summed over the resample (sacreBLEU's own paired
  bootstrap does the same; equal to ``metrics.bleu`` of the resampled pairs);
- DIST-1/2 from each prediction's n-grams (equal to ``metrics.distinct`` of the resampled predictions);
  a resample repeats examples and so their n-grams, which lowers DIST by itself, so DIST's resampled
  values are shifted by their mean bias (the interval keeps the bootstrap's spread around the full set's value);
- PPL pooled from the resampled reference NLLs and token counts (``metrics.perplexity``);
- F1, ROUGE-1/2/L, METEOR and BERTScore as the mean of their per-example scores, which is what they are.

Two runs evaluated on the same examples (the same count, the same data hash where known, the same
references in the same order) are compared on the same resamples (a paired bootstrap): the difference's
confidence interval, whether it contains 0 (*within noise*), and a two-sided p: twice the share of
resamples where the difference has the other sign. Resamples depend only on the seed and the number of
examples, so the output is reproducible. Runs without per-example data (evaluated by an older spt) get no
interval: the reason is reported instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M

METRICS = ("f1", "bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "dist1", "dist2", "meteor", "ppl")
CACHED = ("meteor", "bertscore_f1")  # per-example scores spt eval computes once (they need WordNet, a model)
LOWER_IS_BETTER = {"ppl"}
# A resample repeats examples, and so their n-grams: DIST-n of a resample is lower than the full set's by
# construction. Its resampled values (and differences) are shifted by their mean bias before the interval.
SIZE_BIASED = {"dist1", "dist2"}
PER_EXAMPLE_FILE = "per_example.jsonl"
DEFAULT_RESAMPLES = 1000
LEVEL = 0.95
_TOLERANCE = 1e-6  # relative: per-example data must reproduce metrics.json's values


@dataclass
class PerExample:
    """What an evaluated run's metrics were computed from, row by row."""
    predictions: list[str]
    references: list[str]
    ref_nll: list[float | None]
    ref_tokens: list[int | None]
    cached: dict[str, list[float]] = field(default_factory=dict)  # METEOR, BERTScore F1 per example
    source: str = ""
    note: str | None = None  # e.g. why METEOR/BERTScore cannot be resampled

    def __len__(self) -> int:
        return len(self.references)


def per_example_rows(rows: Sequence[dict], cached: dict[str, list[float]] | None = None) -> list[dict]:
    """What ``spt eval`` keeps of each evaluated row (see the module's doc), in order."""
    out = []
    for i, r in enumerate(rows):
        row = {"prediction": r["prediction"], "reference": r["reference"], "ref_nll": r.get("ref_nll"),
               "ref_tokens": r.get("ref_tokens")}
        for key in ("dialogue_id", "turn"):
            if r.get(key) is not None:
                row[key] = r[key]
        for key, values in (cached or {}).items():
            if len(values) == len(rows):
                row[key] = values[i]
        out.append(row)
    return out


def _from_rows(rows: list[dict], source: str, note: str | None = None) -> PerExample:
    cached = {k: [float(r[k]) for r in rows] for k in CACHED
              if rows and all(_is_number(r.get(k)) for r in rows)}
    return PerExample([r["prediction"] for r in rows], [r["reference"] for r in rows],
                      [r.get("ref_nll") for r in rows], [r.get("ref_tokens") for r in rows], cached, source, note)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _nll_ok(row: dict) -> bool:
    nll, tokens = row.get("ref_nll"), row.get("ref_tokens")
    return nll is None or (_is_number(nll) and _is_number(tokens))


def load_per_example(path: str | Path, metrics: dict) -> PerExample | str:
    """The per-example data of an evaluated run (its folder, its eval folder or its metrics.json), or a
    sentence saying why there is none to resample.

    Read from ``eval/per_example.jsonl``; for runs evaluated before it existed, from the run's
    ``predictions.jsonl`` (then only the metrics computed from text and NLLs can be resampled, not METEOR
    or BERTScore). Either must have as many rows as metrics.json's ``n``."""
    from .data import DataError
    from .report import read_predictions

    path = Path(path)
    if path.is_file():
        eval_dir = path.parent
    elif (path / "eval" / "metrics.json").is_file():
        eval_dir = path / "eval"
    else:
        eval_dir = path
    run_dir = eval_dir.parent if eval_dir.name == "eval" else None
    kept = eval_dir / PER_EXAMPLE_FILE
    try:
        if kept.is_file():
            rows = [json.loads(line) for line in kept.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not all(isinstance(r, dict) and isinstance(r.get("prediction"), str)
                       and isinstance(r.get("reference"), str) and _nll_ok(r) for r in rows):
                return f"{kept} is not per-example data of spt eval"
            ex = _from_rows(rows, str(kept))
        elif run_dir is not None and (run_dir / "predictions.jsonl").is_file():
            ex = _from_rows(read_predictions(run_dir / "predictions.jsonl"), str(run_dir / "predictions.jsonl"),
                            f"evaluated without {PER_EXAMPLE_FILE} (an older spt eval): METEOR and BERTScore "
                            "cannot be resampled; rerun spt eval")
        else:
            return f"no per-example data ({kept} is missing: evaluated by an older spt eval; rerun spt eval)"
    except (OSError, ValueError, DataError) as e:  # json.JSONDecodeError is a ValueError
        return f"per-example data unreadable: {e}"
    if len(ex) != metrics.get("n"):
        return f"{ex.source} has {len(ex)} rows, but metrics.json says n={metrics.get('n')} (rerun spt eval)"
    return ex


class _Resampler:
    """One run's metrics as functions of resampling weights (how often each example was drawn)."""

    def __init__(self, ex: PerExample, keys: Sequence[str]):
        self.n = len(ex)
        preds, refs = ex.predictions, ex.references
        self.means: dict[str, np.ndarray] = {}
        if "f1" in keys:
            self.means["f1"] = np.array([100 * M.unigram_f1(p, r) for p, r in zip(preds, refs, strict=True)])
        if any(k in keys for k in M.ROUGE_KEYS):
            for k, v in M.rouge_per_example(preds, refs).items():
                if k in keys:
                    self.means[k] = np.array(v)
        for k in CACHED:
            if k in keys and k in ex.cached:
                self.means[k] = np.array(ex.cached[k], dtype=float)
        self.bleu = np.array(M.bleu_stats(preds, refs), dtype=float) if "bleu" in keys else None
        self.dist = {n: self._ngram_index(preds, n) for n in (1, 2) if f"dist{n}" in keys}
        self.ppl = None
        if "ppl" in keys:
            scored = [v is not None for v in ex.ref_nll]
            self.ppl = (np.array([v if s else 0.0 for v, s in zip(ex.ref_nll, scored, strict=True)], dtype=float),
                        np.array([t if s else 0 for t, s in zip(ex.ref_tokens, scored, strict=True)], dtype=float))
        self.keys = [k for k in keys if k in self.means or (k == "bleu" and self.bleu is not None)
                     or (k.startswith("dist") and int(k[-1]) in self.dist) or (k == "ppl" and self.ppl is not None)]

    @staticmethod
    def _ngram_index(preds: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For DIST-n: each example's n-gram count, and which examples hold each distinct n-gram (grouped)."""
        ids: dict[tuple[str, ...], int] = {}
        gram_of, example_of, lengths = [], [], []
        for i, p in enumerate(preds):
            grams = M.ngrams(p, n)
            lengths.append(len(grams))
            for g in set(grams):
                gram_of.append(ids.setdefault(g, len(ids)))
                example_of.append(i)
        order = np.argsort(np.array(gram_of, dtype=np.int64), kind="stable")
        grouped = np.array(gram_of, dtype=np.int64)[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if grouped.size else grouped
        return np.array(lengths, dtype=float), np.array(example_of, dtype=np.int64)[order], starts

    def values(self, w: np.ndarray) -> dict[str, float]:
        """Every metric of the resample in which example i appears ``w[i]`` times (all ones: the full set)."""
        out = {k: float(w @ v) / self.n for k, v in self.means.items()}
        if self.bleu is not None:
            out["bleu"] = M.bleu_from_stats(w @ self.bleu)
        for n, (lengths, example_of, starts) in self.dist.items():
            total = float(w @ lengths)
            present = int(np.maximum.reduceat((w > 0)[example_of], starts).sum()) if starts.size else 0
            out[f"dist{n}"] = 100 * present / total if total else 0.0
        if self.ppl is not None:
            ppl = M.perplexity([float(w @ self.ppl[0])], [float(w @ self.ppl[1])])
            out["ppl"] = float("nan") if ppl is None else ppl
        return out


def resample_weights(n: int, resamples: int, seed: int):
    """The bootstrap resamples of n examples, as counts per example; the same for every run of n examples."""
    rng = np.random.default_rng([seed, n])
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, n, n), minlength=n).astype(float)


@dataclass
class Bootstrap:
    """Confidence intervals of each run's metrics and of each run's difference from the first run."""
    resamples: int
    seed: int
    level: float
    base: str
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    no_interval: dict[str, dict[str, str]] = field(default_factory=dict)  # run -> metric (or "*") -> why
    diffs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # run -> metric -> test
    unpaired: dict[str, str] = field(default_factory=dict)  # run -> why its differences are not tested
    notes: dict[str, str] = field(default_factory=dict)  # run -> a remark on its per-example data

    def why_no_interval(self, run: str, key: str) -> str | None:
        reasons = self.no_interval.get(run, {})
        return reasons.get("*") or reasons.get(key)

    def to_json(self) -> dict:
        return {"resamples": self.resamples, "seed": self.seed, "level": self.level, "base": self.base,
                "intervals": {r: {k: list(v) for k, v in ci.items()} for r, ci in self.intervals.items()},
                "no_interval": self.no_interval, "differences": self.diffs, "unpaired": self.unpaired,
                "notes": self.notes}


def _data_hash(metrics: dict) -> str | None:
    info = metrics.get("provenance")
    return info.get("data_sha256") if isinstance(info, dict) else None


def _same_examples(a: tuple[dict, PerExample], b: tuple[dict, PerExample]) -> str | None:
    """None when two runs were evaluated on the same examples in the same order, else why not."""
    (ma, ea), (mb, eb) = a, b
    if len(ea) != len(eb):
        return f"evaluated on different numbers of examples ({len(ea)} and {len(eb)})"
    ha, hb = (_data_hash(m) for m in (ma, mb))
    if ha and hb and ha != hb:
        return "evaluated on different data files (sha256 differs)"
    if ea.references != eb.references:
        return "evaluated on different references (or in another order)"
    return None


def bootstrap(named: Sequence[tuple[str, dict]], examples: Sequence[PerExample | str | None],
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Bootstrap:
    """Bootstrap intervals for every run of ``named`` (name, metrics.json) with its per-example data
    (``examples[i]``: a :class:`PerExample`, or why there is none), and paired tests of each run against
    the first. Only the metrics in :data:`METRICS` that metrics.json holds are resampled."""
    if resamples < 1:
        raise ValueError(f"the number of bootstrap resamples must be >= 1, got {resamples}")
    result = Bootstrap(resamples, seed, level, named[0][0])
    runs: dict[str, _Resampler] = {}
    full: dict[str, dict[str, float]] = {}
    for (name, m), ex in zip(named, examples, strict=True):
        keys = [k for k in METRICS if _is_number(m.get(k))]
        if not isinstance(ex, PerExample):
            result.no_interval[name] = {"*": ex or "no per-example data given"}
            continue
        if ex.note:
            result.notes[name] = ex.note
        r = _Resampler(ex, keys)
        missing = {k: ex.note or "no per-example scores for it" for k in keys if k not in r.keys}
        values = r.values(np.ones(r.n))
        for k in list(r.keys):  # the data must reproduce the reported number, or it is not what was evaluated
            if not math.isclose(values[k], m[k], rel_tol=_TOLERANCE, abs_tol=_TOLERANCE):
                missing[k] = (f"{ex.source} gives {values[k]:.4f}, not metrics.json's {m[k]:.4f} "
                              "(changed since evaluation?)")
                r.keys.remove(k)
        if missing:
            result.no_interval[name] = missing
        runs[name], full[name] = r, values
    samples: dict[str, dict[str, np.ndarray]] = {name: {k: np.empty(resamples) for k in r.keys}
                                                 for name, r in runs.items()}
    for n in sorted({r.n for r in runs.values()}):
        group = [name for name, r in runs.items() if r.n == n]
        for b, w in enumerate(resample_weights(n, resamples, seed)):
            for name in group:
                for k, v in runs[name].values(w).items():
                    if k in samples[name]:
                        samples[name][k][b] = v
    q = [50 * (1 - level), 50 * (1 + level)]
    for name, per_key in samples.items():
        for k, values in per_key.items():
            if np.isfinite(values).any():
                if k in SIZE_BIASED:
                    values = values - (np.nanmean(values) - full[name][k])
                lo, hi = np.nanpercentile(values, q)
                result.intervals.setdefault(name, {})[k] = (float(lo), float(hi))
    by_name = dict(named)
    base = result.base
    for (name, m), ex in list(zip(named, examples, strict=True))[1:]:
        if name not in runs or base not in runs:
            result.unpaired[name] = "no per-example data for " + (name if name not in runs else base)
            continue
        why = _same_examples((by_name[base], examples[0]), (m, ex))
        if why:
            result.unpaired[name] = why
            continue
        tests = {}
        for k in samples[name]:
            if k not in samples[base]:
                continue
            d = samples[name][k] - samples[base][k]
            d = d[np.isfinite(d)]
            if not d.size:
                continue
            observed = m[k] - by_name[base][k]
            if k in SIZE_BIASED:
                d = d - (d.mean() - observed)
            lo, hi = (float(v) for v in np.percentile(d, q))
            flips = 1.0 if observed == 0 else float(np.mean(d <= 0) if observed > 0 else np.mean(d >= 0))
            within = lo <= 0 <= hi
            gain = -observed if k in LOWER_IS_BETTER else observed
            tests[k] = {"diff": observed, "lo": lo, "hi": hi, "p": min(1.0, 2 * flips), "within_noise": within,
                        "verdict": "within noise" if within else ("better" if gain > 0 else "worse")}
        result.diffs[name] = tests
    return result
