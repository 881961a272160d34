"""Hostile input for ``spt eval`` and ``spt generate``, through the real CLI (``spt.cli.main``).

Every case ends in one of two ways:
- refused: exit code 2, ONE line on stderr (``spt: error: FILE:LINE: field ...``) naming the file and the
  line or field, no traceback, nothing written (no metrics.json, no predictions file, no temp file);
- accepted, with what it could not use counted: exit 0, a metrics.json that is strict JSON (no NaN or
  Infinity), the count in it, and no temp file.

The run is an untrained SPT checkpoint (K=2) on a tiny GPT-2 built from a config: no training, no download.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest

import spt
from spt import metrics as M
from spt.cli import main
from spt.config import load_config
from spt.data import Example, write_jsonl
from spt.data.synth import synth_examples
from spt.methods import build_method

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
FAST_EVAL = ["--eval.meteor=false"]
LONG_REPLY = "this reply goes on and on " * 80  # far more than data.max_length=160 tokens


def _no_constants(name: str):
    raise AssertionError(f"metrics.json holds {name}, which is not JSON")


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's json accepts them by default)."""
    return json.loads(text, parse_constant=_no_constants)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err[:500]!r}"
    line = lines[0]
    assert line.startswith("spt: error: "), line
    assert "Traceback" not in err and len(line) < 400, line[:500]
    return line


def build_run(folder: Path, lm_dir: Path) -> Path:
    """An untrained SPT run (checkpoint-best with config.yaml and the K x n x d prompts)."""
    cfg = load_config(TINY, {"model.name_or_path": str(lm_dir), "generate.max_new_tokens": 4,
                             "generate.batch_size": 4})
    build_method(cfg).save(folder / "checkpoint-best", cfg, None)
    return folder


@pytest.fixture(autouse=True)
def no_bertscore(monkeypatch):
    """BERTScore is not what these tests are about: skip it (as eval does when no model can be had) and save
    the seconds importing bert-score takes."""
    monkeypatch.setattr(M, "bertscore", lambda *a, **k: {"skipped": "not computed in these tests"})


@pytest.fixture(scope="module")
def run(tiny_lm_dir, tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("hostile") / "run", tiny_lm_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """data.jsonl (6 examples); long.jsonl: 4 examples, the second with a reference that cannot fit."""
    root = tmp_path_factory.mktemp("data")
    ex = synth_examples(3, seed=1)[:6]
    assert len(ex) == 6
    write_jsonl(ex, root / "data.jsonl")
    long = Example(ex[1].persona, ex[1].context, LONG_REPLY, dialogue_id=ex[1].dialogue_id, turn=ex[1].turn)
    write_jsonl([ex[0], long, ex[2], ex[3]], root / "long.jsonl")
    return {"data": root / "data.jsonl", "long": root / "long.jsonl"}


# --- spt eval -------------------------------------------------------------------------------------

def row(**fields) -> dict:
    base = {"persona": ["i ski."], "context": ["hi , how are you ?"], "reference": "i am fine , i like to ski .",
            "prediction": "i like to ski .", "prompt": 0, "ref_nll": 6.0, "ref_tokens": 3}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def jsonl(*rows: dict | str) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")


GOOD = json.dumps(row())

# (id, file bytes, line named in the error (None: the file as a whole), what the message must say)
REFUSED = [
    ("empty-file", b"", None, "no predictions"),
    ("blank-lines-only", b"\n  \n\n", None, "no predictions"),
    ("binary-bytes", b"\x00\x01\xff\xfe\x80\x81 not text\n", 1, "not UTF-8"),
    ("utf16-file", (GOOD + "\n").encode("utf-16"), 1, "not UTF-8"),
    ("latin1-line", GOOD.encode() + b"\n" + json.dumps(row(prediction="CAFE")).replace("CAFE", "caf\xe9")
     .encode("latin-1") + b"\n", 2, "not UTF-8"),
    ("nul-in-json", b'{"prediction": "a"\x00, "reference": "b"}\n', 1, "invalid JSON"),
    ("1mb-garbage-line", GOOD.encode() + b"\n" + b"x" * 1_000_000 + b"\n", 2, "invalid JSON"),
    ("1mb-unterminated-string", GOOD.encode() + b'\n{"prediction": "' + b"a" * 1_000_000 + b"\n", 2,
     "invalid JSON"),
    ("1mb-prediction", jsonl(row(), row(prediction="word " * 200_000)), 2, "field 'prediction'"),
    ("trailing-garbage", (GOOD + " x\n").encode(), 1, "invalid JSON"),
    ("deep-nesting", b"[" * 100_000 + b"\n", 1, "nested too deeply"),
    ("huge-integer", jsonl(row()).replace(b'"ref_tokens": 3', b'"ref_tokens": ' + b"9" * 5000), 1,
     "invalid JSON"),
    ("number-row", jsonl(row(), "42"), 2, "found a number"),
    ("list-row", jsonl("[1, 2]"), 1, "found a list"),
    ("string-row", jsonl('"i like dogs"'), 1, "found a string"),
    ("null-row", jsonl("null"), 1, "found null"),
    ("bool-row", jsonl("true"), 1, "found a boolean"),
    ("error-after-blank-lines", jsonl(row(), "", row(), "42"), 4, "expected a JSON object"),
    ("missing-prediction", jsonl(row(prediction=DROP)), 1, "field 'prediction' is missing"),
    ("missing-reference", jsonl(row(reference=DROP)), 1, "field 'reference' is missing"),
    ("prediction-number", jsonl(row(prediction=3)), 1, "field 'prediction'"),
    ("reference-list", jsonl(row(reference=["a"])), 1, "field 'reference'"),
    ("lone-surrogate", jsonl(row()).replace(b"i like to ski", b"i like \\ud800 ski"), 1, "field 'prediction'"),
    ("ref-nll-string", jsonl(row(ref_nll="abc")), 1, "field 'ref_nll'"),
    ("ref-nll-nan", jsonl(row()).replace(b'"ref_nll": 6.0', b'"ref_nll": NaN'), 1, "field 'ref_nll': expected a "
     "finite number >= 0 or null, found nan"),
    ("ref-nll-infinity", jsonl(row()).replace(b'"ref_nll": 6.0', b'"ref_nll": Infinity'), 1, "field 'ref_nll'"),
    ("ref-nll-overflow", jsonl(row()).replace(b'"ref_nll": 6.0', b'"ref_nll": 1e999'), 1, "field 'ref_nll'"),
    ("ref-nll-negative", jsonl(row(ref_nll=-1.0)), 1, "field 'ref_nll'"),
    ("ref-nll-int-too-big-for-a-float", jsonl(row(ref_nll=10 ** 400)), 1, "field 'ref_nll'"),
    ("ref-tokens-int-too-big-for-a-float", jsonl(row(ref_tokens=10 ** 400)), 1, "field 'ref_tokens'"),
    ("ref-nll-bool", jsonl(row(ref_nll=True)), 1, "field 'ref_nll'"),
    ("ref-tokens-zero", jsonl(row(), row(ref_tokens=0)), 2, "field 'ref_tokens': expected an integer >= 1 where "
     "ref_nll is set, found 0"),
    ("ref-tokens-string", jsonl(row(ref_tokens="3")), 1, "field 'ref_tokens'"),
    ("ref-tokens-float", jsonl(row(ref_tokens=2.5)), 1, "field 'ref_tokens'"),
    ("ref-tokens-missing", jsonl(row(ref_tokens=DROP)), 1, "field 'ref_tokens'"),
    ("ref-tokens-negative-unscored", jsonl(row(ref_nll=None, ref_tokens=-2)), 1, "field 'ref_tokens'"),
    ("prompt-string", jsonl(row(prompt="1")), 1, "field 'prompt'"),
    ("prompt-float", jsonl(row(prompt=1.5)), 1, "field 'prompt'"),
    ("prompt-bool", jsonl(row(prompt=True)), 1, "field 'prompt'"),
    ("persona-string", jsonl(row(persona="i ski.")), 1, "field 'persona'"),
    ("context-numbers", jsonl(row(context=[1, 2])), 1, "field 'context'"),
    ("style-list", jsonl(row(style=["terse"])), 1, "field 'style'"),
    ("by-prompt-string", jsonl(row(ref_nll_by_prompt="x")), 1, "field 'ref_nll_by_prompt'"),
    ("by-prompt-empty", jsonl(row(ref_nll_by_prompt=[])), 1, "field 'ref_nll_by_prompt'"),
    ("by-prompt-nan", jsonl(row()).replace(b'"ref_tokens": 3', b'"ref_tokens": 3, "ref_nll_by_prompt": [1.0, NaN]'),
     1, "field 'ref_nll_by_prompt'"),
    ("by-prompt-without-ref-nll", jsonl(row(ref_nll=None, ref_nll_by_prompt=[1.0, 2.0])), 1, "field 'ref_nll'"),
]


@pytest.mark.parametrize(("content", "line", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_eval_refuses_unusable_rows(run, tmp_path, capsys, content, line, says):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(content)
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", str(run), "--predictions", str(preds), "--out", str(out), *FAST_EVAL]) == 2
    msg = one_line_error(capsys.readouterr().err)
    where = f"{preds}:{line}: " if line is not None else f"{preds}: "
    assert where in msg and says in msg, msg
    assert not out.exists()  # nothing scored, nothing written
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_eval_without_a_predictions_file(run, tmp_path, capsys, kind):
    preds = tmp_path / "preds.jsonl"
    if kind == "folder":
        preds.mkdir()
    capsys.readouterr()
    assert main(["eval", str(run), "--predictions", str(preds), "--out", str(tmp_path / "eval"), *FAST_EVAL]) == 2
    assert str(preds) in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


def _eval_ok(run: Path, tmp_path: Path, content: bytes, *extra: str) -> dict:
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(content)
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--predictions", str(preds), "--out", str(out), *FAST_EVAL, *extra]) == 0
    metrics = strict_json((out / "metrics.json").read_text(encoding="utf-8"))
    assert (out / "report.md").stat().st_size > 100
    assert temp_files(tmp_path) == []
    return metrics


def test_eval_no_scored_tokens_leaves_ppl_out(run, tmp_path):
    """All references unscored (ref_nll null, ref_tokens 0): PPL is undefined; never NaN in metrics.json."""
    m = _eval_ok(run, tmp_path, jsonl(row(ref_nll=None, ref_tokens=0), row(ref_nll=None, ref_tokens=0)))
    assert m["n"] == 2 and "ppl" not in m and "ppl_unscored" not in m
    assert m["f1"] == pytest.approx(100 * 8 / 11)  # 4 of 4 predicted words in the 7 of the reference


def test_non_finite_metrics_never_reach_metrics_json(tmp_path, caplog):
    """Whatever a metric returns, metrics.json is strict JSON: NaN and Infinity become null (warned)."""
    from spt.report import write_report

    assert M.perplexity([], []) is None and M.perplexity([1.0], [0]) is None
    assert M.perplexity([float("inf")], [3]) is None
    metrics = {"n": 1, "f1": float("nan"), "bleu": 1.0, "ppl": float("inf"), "extra": [1.0, -math.inf]}
    with caplog.at_level(logging.WARNING):
        write_report(tmp_path / "eval", "x", metrics, [row()], None, samples=1)
    saved = strict_json((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == {"n": 1, "f1": None, "bleu": 1.0, "ppl": None, "extra": [1.0, None]}
    assert "metrics.f1 is nan" in caplog.text and "metrics.extra[1] is -inf" in caplog.text
    assert temp_files(tmp_path) == []


def test_eval_ppl_over_scored_rows_counts_the_rest(run, tmp_path, caplog):
    rows = [row(ref_nll=6.0, ref_tokens=3), row(ref_nll=None, ref_tokens=0), row(ref_nll=2.0, ref_tokens=1)]
    with caplog.at_level(logging.WARNING):
        m = _eval_ok(run, tmp_path, jsonl(*rows))
    assert m["ppl"] == pytest.approx(math.exp(8.0 / 4)) and m["ppl_unscored"] == 1
    assert "PPL is over 2 of 3 references" in caplog.text
    assert "were not scored" in (tmp_path / "eval" / "report.md").read_text()


def test_eval_counts_out_of_range_prompts(run, tmp_path, caplog):
    """K=2: prompts -1, 2 and 99 are counted, warned about and kept out of the histogram."""
    prompts = [0, 1, 1, -1, 2, 99, None]
    with caplog.at_level(logging.WARNING):
        m = _eval_ok(run, tmp_path, jsonl(*(row(prompt=p, style="terse") for p in prompts)))
    assert m["n"] == 7
    assert m["selection"]["histogram"] == [1, 2]
    assert m["selection_out_of_range"] == 3 and m["selection_missing"] == 1
    assert m["selection_by_style"] == {"terse": [1, 2]}
    assert "3 row(s) have a prompt index outside 0..K-1 (K=2)" in caplog.text
    assert "3 row(s) name a prompt outside" in (tmp_path / "eval" / "report.md").read_text()


def test_eval_all_prompts_out_of_range(run, tmp_path):
    m = _eval_ok(run, tmp_path, jsonl(row(prompt=5), row(prompt=-3)))
    assert m["selection_out_of_range"] == 2 and "selection" not in m


def test_eval_routing_ignores_rows_scored_under_another_k(run, tmp_path):
    rows = [row(prompt=0, ref_nll=1.0, ref_tokens=2, ref_nll_by_prompt=[1.0, 3.0]),
            row(prompt=1, ref_nll=5.0, ref_tokens=2, ref_nll_by_prompt=[4.0, 5.0, 0.5])]  # 3 entries, K=2
    m = _eval_ok(run, tmp_path, jsonl(*rows))
    assert m["select_acc"] == 1.0 and m["ref_loss_oracle"] == pytest.approx(0.5)
    assert m["ppl"] == pytest.approx(math.exp(6.0 / 4))  # PPL still uses both rows


@pytest.mark.parametrize(("content", "n"), [
    (b"\xef\xbb\xbf" + jsonl(row(), row()).replace(b"\n", b"\r\n"), 2),  # UTF-8 BOM, CRLF line ends
    (jsonl(row(prediction="", reference="")), 1),  # empty texts score 0, not an error
    (jsonl(row(prediction="我喜欢滑雪 🎿", reference="i ski ☃", persona=None, context=None, style=None)), 1),
    (jsonl(row(ref_nll=1e300, ref_tokens=1)), 1),  # huge NLL: PPL capped, finite
], ids=["bom-crlf", "empty-texts", "unicode-and-nulls", "huge-nll"])
def test_eval_accepts_odd_but_valid_rows(run, tmp_path, content, n):
    m = _eval_ok(run, tmp_path, content)
    assert m["n"] == n and all(math.isfinite(v) for v in m.values() if isinstance(v, float))


def test_eval_without_a_run_infers_k(tmp_path):
    """No run folder: K comes from the rows (largest index + 1), so nothing is out of range but -1."""
    m = _eval_ok(tmp_path / "no-run", tmp_path, jsonl(row(prompt=0), row(prompt=6), row(prompt=-1)))
    assert len(m["selection"]["histogram"]) == 7 and m["selection_out_of_range"] == 1


# --- spt generate ---------------------------------------------------------------------------------

def _generate(run: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["generate", str(run), "--data", str(data), "--out", str(out), "--no-progress", *extra])


def _rows(path: Path) -> list[dict]:
    return [strict_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(("extra", "says"), [
    (["--limit", "-1"], r"--limit must be a number of examples >= 1, got -1"),
    (["--limit", "0"], r"--limit must be a number of examples >= 1, got 0"),
    (["--spt.K=3"], r"only --generate\.\* and --model\.name_or_path"),
    (["--generate.batch_size=0"], r"generate\.batch_size must be > 0"),
    (["--generate.max_new_tokens=1000"], r"max_new_tokens.*1000.*data\.max_length.*\b160\b"),  # the run's 160
    (["--generate.max_new_tokens=159"], r"max_new_tokens=159 leaves no room for the input within data\.max_length=160"),
], ids=["limit-negative", "limit-zero", "override-not-for-generate", "batch-size-zero", "max-new-tokens-too-big",
        "max-new-tokens-no-room-left"])
def test_generate_refuses_bad_options(run, data, tmp_path, capsys, extra, says):
    """``says`` is a regular expression the one-line message must match."""
    out = tmp_path / "preds.jsonl"
    capsys.readouterr()
    assert _generate(run, data["data"], out, *extra) == 2
    msg = one_line_error(capsys.readouterr().err)
    assert re.search(says, msg), msg
    assert not out.exists() and temp_files(tmp_path) == []


BAD_DATA = [
    ("empty", b"", "no examples"),
    ("binary", b"\x00\xff\xfe\x80 garbage\n", "not UTF-8"),
    ("number-rows", b"42\n", "expected a JSON object"),
    ("missing-response", jsonl({"persona": ["i ski."], "context": ["hi"]}), "field 'response'"),
]


@pytest.mark.parametrize(("content", "says"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_generate_refuses_bad_data(run, tmp_path, capsys, content, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "preds.jsonl"
    capsys.readouterr()
    assert _generate(run, bad, out) == 2
    msg = one_line_error(capsys.readouterr().err)
    assert str(bad) in msg and says in msg, msg
    assert not out.exists() and temp_files(tmp_path) == []


def test_generate_limit_takes_the_first_examples(run, data, tmp_path):
    assert _generate(run, data["data"], tmp_path / "p.jsonl", "--limit", "2") == 0
    rows = _rows(tmp_path / "p.jsonl")
    first = [json.loads(line) for line in data["data"].read_text().splitlines()[:2]]
    assert [r["reference"] for r in rows] == [f["response"] for f in first]


def test_over_long_reference_in_a_batch(run, data, tmp_path, caplog):
    """One reference longer than data.max_length in a batch of 4: the batch still generates and scores;
    that row gets ref_nll null (counted, warned), the others the same NLL as when scored one at a time,
    and eval's PPL is over the 3 scored references with the 4th counted."""
    batched, alone = tmp_path / "batched.jsonl", tmp_path / "alone.jsonl"
    with caplog.at_level(logging.WARNING):
        assert _generate(run, data["long"], batched, "--generate.batch_size=4") == 0
    assert "1 of 4 reference(s) not scored (ref_nll null)" in caplog.text
    assert _generate(run, data["long"], alone, "--generate.batch_size=1") == 0
    rows, single = _rows(batched), _rows(alone)
    assert len(rows) == 4 and rows[1]["reference"] == LONG_REPLY.strip()
    assert rows[1]["ref_nll"] is None and rows[1]["ref_tokens"] == 0 and "ref_nll_by_prompt" not in rows[1]
    for i in (0, 2, 3):
        assert rows[i]["ref_tokens"] == single[i]["ref_tokens"] > 1
        assert rows[i]["ref_nll"] == pytest.approx(single[i]["ref_nll"], rel=1e-4)
        assert len(rows[i]["ref_nll_by_prompt"]) == 2
        assert rows[i]["ref_nll"] == rows[i]["ref_nll_by_prompt"][rows[i]["prompt"]]
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--predictions", str(batched), "--out", str(out), *FAST_EVAL]) == 0
    m = strict_json((out / "metrics.json").read_text())
    scored = [rows[i] for i in (0, 2, 3)]
    expected = math.exp(sum(r["ref_nll"] for r in scored) / sum(r["ref_tokens"] for r in scored))
    assert m["ppl"] == pytest.approx(expected) and m["ppl_unscored"] == 1
    assert sum(m["selection"]["histogram"]) == 4
    assert temp_files(tmp_path) == []


def test_moved_base_model(tiny_lm_dir, data, tmp_path, capsys):
    """The run's base model folder is gone: one line naming the run's config, the path it expected and the
    flag that fixes it; with --model.name_or_path the run loads (CLI and Python API); eval needs no model."""
    lm = tmp_path / "base-lm"
    shutil.copytree(tiny_lm_dir, lm)
    moved = build_run(tmp_path / "run", lm)
    shutil.rmtree(lm)
    out = tmp_path / "preds.jsonl"
    capsys.readouterr()
    assert _generate(moved, data["data"], out, "--limit", "2") == 2
    msg = one_line_error(capsys.readouterr().err)
    config = moved / "checkpoint-best" / "config.yaml"
    assert f"{config}: the run's base model (model.name_or_path) '{lm}' does not exist" in msg
    assert "--model.name_or_path=NEW_PATH" in msg and "Repo id" not in msg
    assert not out.exists() and temp_files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match=re.escape("--model.name_or_path=NEW_PATH")):
        spt.load(moved)

    assert _generate(moved, data["data"], out, "--limit", "2", f"--model.name_or_path={tiny_lm_dir}") == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["prompt"] in (0, 1) and r["ref_nll"] > 0 for r in rows)
    bot = spt.load(moved, overrides={"model.name_or_path": str(tiny_lm_dir)})
    assert bot.config.model.name_or_path == str(tiny_lm_dir)
    assert main(["eval", str(moved), "--predictions", str(out), "--out", str(tmp_path / "eval"), *FAST_EVAL,
                 f"--model.name_or_path={tmp_path / 'anywhere'}"]) == 0
    assert strict_json((tmp_path / "eval" / "metrics.json").read_text())["n"] == 2
