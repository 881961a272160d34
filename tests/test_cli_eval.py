"""spt train -> spt generate -> spt eval -> spt compare through the real CLI, and the Python API."""

import json
from pathlib import Path

import pytest

import spt
from conftest import tiny_train_args
from spt.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
METRIC_KEYS = {"f1", "f1_unnormalized", "bleu", "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL",
               "dist1", "dist2", "ppl", "avg_len", "selection", "selection_by_style"}


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "spt"
    assert main(tiny_train_args(tiny_lm_dir, synth_dir, out)) == 0
    return out


def test_generate_eval_compare(trained, synth_dir, tmp_path, capsys):
    assert main(["generate", str(trained), "--data", str(synth_dir / "valid.jsonl"), "--limit", "24",
                 "--no-progress", "--generate.max_new_tokens=8", "--generate.batch_size=8"]) == 0
    rows = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert {"persona", "context", "reference", "prediction", "prompt", "scores", "style"} <= set(rows[0])
    assert all(0 <= r["prompt"] < 2 and len(r["scores"]) == 2 for r in rows)

    assert main(["eval", str(trained), "--eval.bertscore_model=none-such-model-folder", "--eval.meteor=false"]) == 0
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert all(isinstance(metrics[k], float) for k in METRIC_KEYS - {"selection", "selection_by_style"})
    assert "could not be loaded" in metrics["bertscore_skipped"]  # said clearly, not silently dropped
    assert sum(metrics["selection"]["histogram"]) == 24
    # routing on the evaluated references: every row scored under each prompt, the pick among them
    assert all(len(r["ref_nll_by_prompt"]) == 2 and r["ref_nll"] == r["ref_nll_by_prompt"][r["prompt"]]
               for r in rows)
    assert metrics["ref_loss_oracle"] <= metrics["ref_loss_selected"]
    assert metrics["ref_loss_oracle"] <= metrics["ref_loss_mean_prompt"]
    tokens = sum(r["ref_tokens"] for r in rows)
    assert metrics["ref_loss_oracle"] == pytest.approx(sum(min(r["ref_nll_by_prompt"]) for r in rows) / tokens)
    best = [min(range(2), key=lambda k, r=r: r["ref_nll_by_prompt"][k]) for r in rows]
    assert metrics["select_acc"] == pytest.approx(sum(b == r["prompt"] for b, r in zip(best, rows, strict=True)) / 24)
    for name in ("report.md", "selection.png", "loss_curves.png", "routing.png"):
        assert (trained / "eval" / name).stat().st_size > 100
    report = (trained / "eval" / "report.md").read_text()
    assert "| run | n | F1 | BLEU | ROUGE-1" in report and "## Samples" in report
    assert "| BERTScore |" in report and "| n/a |" in report  # skipped, and the table says so
    kept = [json.loads(line) for line in (trained / "eval" / "per_example.jsonl").read_text().splitlines()]
    assert [(k["prediction"], k["ref_nll"]) for k in kept] == [(r["prediction"], r["ref_nll"]) for r in rows]
    assert "the retriever picked the best prompt for" in report and "![routing](routing.png)" in report

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**metrics, "f1": metrics["f1"] + 1.0, "dist2": metrics["dist2"] * 2 + 1}))
    capsys.readouterr()
    assert main(["compare", str(trained), str(other), "--out", str(tmp_path / "cmp.md")]) == 0
    table = capsys.readouterr().out
    assert "AVG rel. %" in table and "| other |" in table and (tmp_path / "cmp.md").read_text().strip() == table.strip()
    assert f"| {trained.name} | 24 | {metrics['f1']:.2f} [" in table  # resampled from eval/per_example.jsonl
    assert f"| other | 24 | {metrics['f1'] + 1:.2f} [n/a] |" in table  # a bare metrics.json: nothing to resample


def test_python_api(trained):
    bot = spt.load(trained)
    reply = bot.respond(["i have a dog.", "i love hiking."], ["hi ! do you have pets ?"], max_new_tokens=6)
    assert isinstance(reply.text, str) and reply.prompt in (0, 1) and len(reply.scores) == 2
    outs = bot.generate([spt.Example(("i ski.",), ("hello",), "hi")], max_new_tokens=4)
    assert len(outs) == 1 and outs[0].ref_nll is not None
    with pytest.raises(ValueError, match="unknown generation option"):
        bot.respond(["i ski."], ["hi"], beams=3)


def test_eval_bad_predictions_file(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prediction": "a", "reference": "b"}\n{"prediction": 3}\n')
    assert main(["eval", str(tmp_path), "--predictions", str(bad)]) == 2
    assert "p.jsonl:2: field 'prediction'" in capsys.readouterr().err


def test_predictions_and_metrics_carry_their_provenance(tiny_lm_dir, synth_dir, tmp_path, monkeypatch):
    """Run paths are absolute (the run works from another folder), and generate/eval say how results were made."""
    import shutil

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for name in ("train", "valid"):
        shutil.copy(synth_dir / f"{name}.jsonl", work / "data" / f"{name}.jsonl")
    monkeypatch.chdir(work)
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    assert main(["train", "--config", tiny, "--output-dir", "run", "--no-progress", "--train.max_steps=1",
                 f"--model.name_or_path={tiny_lm_dir}", "--data.train=data/train.jsonl",
                 "--data.valid=data/valid.jsonl"]) == 0
    assert f"valid: {work / 'data' / 'valid.jsonl'}" in (work / "run" / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # elsewhere: the run still finds its data
    assert main(["generate", str(work / "run"), "--limit", "3", "--no-progress", "--generate.max_new_tokens=4",
                 "--generate.num_beams=2"]) == 0
    info = json.loads((work / "run" / "predictions.provenance.json").read_text())
    assert info["data"] == str(work / "data" / "valid.jsonl") and info["examples"] == 3 and info["limit"] == 3
    assert info["generation"]["num_beams"] == 2 and info["base_model"] == str(tiny_lm_dir)
    assert info["checkpoint"].endswith("checkpoint-best") and info["trained_steps"] == 1
    assert len(info["data_sha256"]) == 64 and info["method"] == "spt" and info["spt_version"]
    assert main(["eval", str(work / "run"), "--eval.meteor=false", "--eval.bertscore_model=none"]) == 0
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    assert metrics["provenance"] == info
    assert "num_beams=2" in (work / "run" / "eval" / "report.md").read_text()


def test_compare_flags_runs_evaluated_on_different_examples(tmp_path, capsys):
    def run(name, n, sha):
        folder = tmp_path / name / "eval"
        folder.mkdir(parents=True)
        metrics = {"n": n, "f1": 10.0 + n, "bleu": 1.0, "provenance": {"data_sha256": sha, "checkpoint": "x"}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return str(tmp_path / name)

    same = [run("a", 30, "d" * 64), run("b", 30, "d" * 64)]
    assert main(["compare", *same]) == 0
    out = capsys.readouterr().out
    assert "Not like with like" not in out and "| a | 30 |" in out
    assert main(["compare", run("c", 30, "d" * 64), run("d", 4, "d" * 64)]) == 0
    out = capsys.readouterr().out
    assert "Not like with like" in out and "c: n=30" in out and "d: n=4" in out
    assert main(["compare", run("e", 30, "d" * 64), run("f", 30, "e" * 64)]) == 0
    assert "Not like with like" in capsys.readouterr().out


def test_plots_answer_one_question_each_with_titles_and_labels(tmp_path):
    from spt.report import comparison_figure, loss_figure

    csv = tmp_path / "metrics.csv"
    rows = ["step,split,name,value"] + [f"{s},train,{n},{v / s}" for s in range(1, 6)
                                        for n, v in (("loss", 9.0), ("llm", 5.0), ("sel", 1.0), ("ctr", 0.0))]
    csv.write_text("\n".join([*rows, "0,valid,loss,5.5", "5,valid,loss,4.0"]) + "\n")
    fig = loss_figure(csv, "Training of x")
    lm, aux = fig.axes
    assert fig._suptitle.get_text() == "Training of x"
    assert lm.get_title() == "LM loss of the reference replies" and lm.get_ylabel() == "nats per token"
    assert [t.get_text() for t in lm.get_legend().get_texts()] == ["training batches", "validation set"]
    # the weighted total is not drawn against its parts, and a loss that is always 0 is left out
    assert [t.get_text() for t in aux.get_legend().get_texts()] == ["selection loss"]
    assert all(float(t).is_integer() for t in lm.get_xticks())
    named = [("pt", {"f1": 10.0, "bleu": 0.7, "ppl": 30.0}), ("spt", {"f1": 12.0, "bleu": 0.9, "ppl": 28.0})]
    fig = comparison_figure(named, "study")
    quality, ppl = fig.axes
    assert quality.get_ylabel() == "score (0-100)" and "higher is better" in quality.get_title()
    assert "lower is better" in ppl.get_title() and [t.get_text() for t in ppl.get_xticklabels()] == ["pt", "spt"]
    assert [lbl.get_text() for lbl in quality.texts][:2] == ["10.0", "0.7"]  # bars carry their values
