"""Noise in comparisons: bootstrap intervals per metric and paired tests, on real metric values."""

import json
import random

import numpy as np
import pytest

from spt import metrics as M
from spt.bootstrap import PerExample, _Resampler, bootstrap, load_per_example, resample_weights
from spt.cli import main
from spt.config import EvalConfig
from spt.data.synth import synth_examples
from spt.report import compare_runs, comparison_figure, compute_metrics, write_report

KEYS = ["f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "ppl"]


@pytest.fixture(autouse=True)
def no_bertscore(monkeypatch):
    """BERTScore needs a model (loading one takes longer than these tests); one test fakes its scores."""
    monkeypatch.setattr(M, "bertscore", lambda *a, **k: {"skipped": "not computed in these tests"})


@pytest.fixture(scope="module")
def refs():
    return [e.response for e in synth_examples(40, seed=3)][:200]


def predictions(refs, share: float, seed: int) -> list[str]:
    """Each reference copied with probability ``share``, else another example's reference (a fluent miss)."""
    rng = random.Random(seed)
    return [r if rng.random() < share else refs[(i + 7) % len(refs)] for i, r in enumerate(refs)]


def rows_of(preds, refs, seed=0):
    rng = random.Random(seed)
    rows = []
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        tokens = len(r.split())
        rows.append({"prediction": p, "reference": r, "ref_nll": rng.uniform(1.0, 3.0) * tokens,
                     "ref_tokens": tokens, "dialogue_id": f"d{i // 8}", "turn": i % 8})
    return rows


def evaluated(rows, cached=None):
    """(metrics, PerExample) as spt eval would give them (METEOR included, BERTScore left out)."""
    cfg = EvalConfig(meteor=True)
    metrics = compute_metrics(rows, cfg)
    per = metrics.pop("_per_example")
    ex = PerExample([r["prediction"] for r in rows], [r["reference"] for r in rows], [r["ref_nll"] for r in rows],
                    [r["ref_tokens"] for r in rows], {**per, **(cached or {})}, "memory")
    return metrics, ex


def test_resamples_are_scored_by_the_real_metric_functions(refs):
    preds = predictions(refs, 0.5, 1)
    rows = rows_of(preds, refs)
    metrics, ex = evaluated(rows)
    r = _Resampler(ex, [*KEYS, "meteor"])
    full = r.values(np.ones(len(refs)))
    assert full == pytest.approx({k: metrics[k] for k in [*KEYS, "meteor"]}, rel=1e-9)
    w = next(resample_weights(len(refs), 1, seed=5))
    idx = [i for i, c in enumerate(w) for _ in range(int(c))]  # the resample as a list of examples
    p, q = [preds[i] for i in idx], [refs[i] for i in idx]
    expected = {"f1": M.f1(p, q), "bleu": M.bleu(p, q), **M.rouge(p, q), "dist1": M.distinct(p, 1),
                "dist2": M.distinct(p, 2), "meteor": M.meteor(p, q)["meteor"],
                "ppl": M.perplexity([rows[i]["ref_nll"] for i in idx], [rows[i]["ref_tokens"] for i in idx])}
    assert r.values(w) == pytest.approx(expected, rel=1e-9)
    assert len(idx) == len(refs) and len(set(idx)) < len(refs)  # drawn with replacement


def test_a_clearly_better_run_is_significant_and_an_identical_one_is_within_noise(refs):
    worse, ex_worse = evaluated(rows_of(predictions(refs, 0.3, 1), refs))
    better, ex_better = evaluated(rows_of(predictions(refs, 0.7, 2), refs))
    named = [("worse", worse), ("better", better), ("again", dict(worse))]
    md, boot = compare_runs(named, [ex_worse, ex_better, ex_worse], resamples=300, seed=0)

    for k in ("f1", "bleu", "rougeL", "meteor"):
        lo, hi = boot.intervals["worse"][k]
        assert lo < worse[k] < hi  # the interval is around the reported value
        test = boot.diffs["better"][k]
        assert test["lo"] > 0 and test["verdict"] == "better" and not test["within_noise"] and test["p"] < 0.01
        same = boot.diffs["again"][k]
        assert same["within_noise"] and same["lo"] == same["hi"] == 0 and same["p"] == 1.0
    lo, hi = boot.intervals["worse"]["dist2"]
    assert lo < worse["dist2"] < hi  # DIST's resampling bias is taken out
    row = next(line for line in md.splitlines() if line.startswith("| better | +"))
    f1_cell = row.split(" | ")[1]
    assert f1_cell.startswith(f"{better['f1'] - worse['f1']:+.2f} [+") and "~" not in f1_cell
    again = next(line for line in md.splitlines() if line.startswith("| again | +"))
    assert again.count(" ~") == 9 and again.endswith("| 0 | 0 | 9 | +0.0 |")  # better | worse | within noise
    assert "`~` within noise: the interval contains 0" in md and "AVG rel. %: the paper's average" in md
    assert "| worse | 200 | " in md and f"{worse['f1']:.2f} [" in md
    assert "p (two-sided)" in md


def test_the_bootstrap_is_reproducible_with_its_seed(refs):
    a, ea = evaluated(rows_of(predictions(refs, 0.4, 1), refs))
    b, eb = evaluated(rows_of(predictions(refs, 0.5, 2), refs))
    runs = [("a", a), ("b", b)]
    first = bootstrap(runs, [ea, eb], resamples=100, seed=7).to_json()
    assert bootstrap(runs, [ea, eb], resamples=100, seed=7).to_json() == first
    assert bootstrap(runs, [ea, eb], resamples=100, seed=8).to_json()["intervals"] != first["intervals"]
    assert json.loads(json.dumps(first)) == first  # JSON-ready (comparison.json)


def test_runs_without_per_example_data_get_no_invented_interval(refs):
    a, ea = evaluated(rows_of(predictions(refs, 0.4, 1), refs))
    b = dict(a, f1=a["f1"] + 1)
    md, boot = compare_runs([("a", a), ("old", b)], [ea, "no per-example data (evaluated by an older spt eval)"])
    assert f"| old | 200 | {b['f1']:.2f} [n/a] |" in md
    assert "[n/a]: no interval" in md and "old: no per-example data (evaluated by an older spt eval)" in md
    assert "Not tested (no interval of the difference): old: no per-example data for old" in md
    assert "old" not in boot.diffs and "old" not in boot.intervals
    # other examples (another order of the references): intervals each, but no paired test
    shuffled = rows_of(predictions(refs, 0.4, 1), refs)[::-1]
    c, ec = evaluated(shuffled)
    _, boot = compare_runs([("a", a), ("reversed", c)], [ea, ec], resamples=50)
    assert "reversed" in boot.intervals and boot.unpaired["reversed"].startswith("evaluated on different references")
    md, _ = compare_runs([("a", a), ("b", b)], [ea, ea], resamples=0)
    assert "No confidence intervals: the bootstrap is off" in md and "[" not in md.split("\n\n")[0]


def test_comparison_figure_draws_the_intervals_as_error_bars(refs):
    from matplotlib.container import ErrorbarContainer

    a, ea = evaluated(rows_of(predictions(refs, 0.3, 1), refs))
    b, eb = evaluated(rows_of(predictions(refs, 0.7, 2), refs))
    named = [("pt", a), ("spt", b)]
    _, boot = compare_runs(named, [ea, eb], resamples=100)
    fig = comparison_figure(named, "study", boot)
    quality, ppl = fig.axes
    assert fig._suptitle.get_text() == "study" and "higher is better" in quality.get_title()
    assert "lower is better" in ppl.get_title()
    bars = [c for c in quality.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and len([c for c in ppl.containers if isinstance(c, ErrorbarContainer)]) == 1
    segments = bars[0].lines[2][0].get_segments()  # pt's F1 error bar spans its interval
    assert segments[0][:, 1] == pytest.approx(boot.intervals["pt"]["f1"])
    assert any("95% bootstrap confidence intervals" in t.get_text() for t in fig.texts)
    labels = [t.get_text() for t in quality.texts]
    assert f"{a['f1']:.1f}" in labels and not any(lbl.endswith("~") for lbl in labels[:8])
    plain = comparison_figure(named, "study")  # without intervals: no error bars
    assert not any(isinstance(c, ErrorbarContainer) for c in plain.axes[0].containers)


def test_eval_keeps_per_example_scores_and_compare_uses_them(refs, tmp_path, monkeypatch, capsys):
    """spt eval writes eval/per_example.jsonl (BERTScore computed once, per example); spt compare resamples it,
    checks it against metrics.json, and falls back to predictions.jsonl for runs evaluated without it."""
    def fake_bertscore(preds, refs, *args):
        each = [100.0 if p == r else 40.0 for p, r in zip(preds, refs, strict=True)]
        return {"precision": 0.0, "recall": 0.0, "f1": sum(each) / len(each), "model": "fake", "layer": 1,
                "per_example_f1": each}

    monkeypatch.setattr(M, "bertscore", fake_bertscore)
    cfg = EvalConfig(meteor=False)
    runs = []
    for name, share in (("pt", 0.3), ("spt", 0.7)):
        rows = rows_of(predictions(refs, share, len(runs)), refs)
        metrics = compute_metrics(rows, cfg)
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_report(tmp_path / name / "eval", name, metrics, rows, None, samples=1)
        runs.append(tmp_path / name)
    saved = json.loads((runs[0] / "eval" / "metrics.json").read_text())
    assert "_per_example" not in saved and "bertscore_f1" in saved
    kept = [json.loads(line) for line in (runs[0] / "eval" / "per_example.jsonl").read_text().splitlines()]
    assert len(kept) == 200 and {"prediction", "reference", "ref_nll", "ref_tokens", "bertscore_f1"} <= set(kept[0])

    png = tmp_path / "cmp.png"
    assert main(["compare", *map(str, runs), "--bootstrap", "200", "--plot", str(png), "--out",
                 str(tmp_path / "cmp.md")]) == 0
    out = capsys.readouterr().out
    spt_row = next(line for line in out.splitlines() if line.startswith("| spt | +"))
    assert "~" not in spt_row.split(" | ")[6]  # BERTScore: resampled from the kept per-example scores
    assert png.stat().st_size > 1000 and (tmp_path / "cmp.md").read_text().strip() == out.strip()
    assert main(["compare", *map(str, runs), "--bootstrap", "200"]) == 0
    assert capsys.readouterr().out == out  # the same seed: the same table

    # evaluated by an older spt: no per_example.jsonl; predictions.jsonl still gives the text metrics
    (runs[1] / "eval" / "per_example.jsonl").unlink()
    old = load_per_example(runs[1], json.loads((runs[1] / "eval" / "metrics.json").read_text()))
    assert isinstance(old, PerExample) and "bertscore_f1" not in old.cached
    assert main(["compare", *map(str, runs), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "] | n/a |" not in out and "[n/a]" in out and "METEOR and BERTScore cannot be resampled" in out
    # a metrics.json its per-example data no longer reproduces: no interval, and why
    metrics = json.loads((runs[0] / "eval" / "metrics.json").read_text())
    (runs[0] / "eval" / "metrics.json").write_text(json.dumps({**metrics, "f1": metrics["f1"] + 5}))
    assert main(["compare", str(runs[0]), "--bootstrap", "50"]) == 0
    assert "not metrics.json's" in capsys.readouterr().out


def test_skipped_metrics_read_n_a_in_tables():
    from spt.report import metrics_table

    table = metrics_table([("x", {"n": 3, "f1": 1.0, "bertscore_skipped": "bert-score is not installed",
                                  "meteor_skipped": "NLTK WordNet data not found"})])
    assert "| BERTScore |" in table and "| METEOR |" in table and table.endswith("| x | 3 | 1.00 | n/a | n/a |")
