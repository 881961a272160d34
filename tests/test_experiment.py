import json

import pytest

from spt.cli import main
from spt.config import ConfigError
from spt.experiment import load_experiment


def test_experiment_runs_arms_skips_finished_and_compares(synth_dir, tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
name: tiny-study
config: {tmp_path / 'base.yaml'}
output_dir: {tmp_path / 'out'}
split: {{source: {synth_dir / 'train.jsonl'}, fractions: "train=0.75,valid=0.25", seed: 1}}
overrides: {{train.max_steps: 2, train.eval_every: 2, train.batch_size: 4, generate.max_new_tokens: 4,
            eval.meteor: false, eval.bertscore_model: no-model-here, data.max_length: 160}}
generate: {{limit: 6}}
arms:
  - {{name: base-lm, compare: false, overrides: {{method: finetune, model.init: scratch, baseline.loss_on: all,
      model.scratch.n_layer: 1, model.scratch.n_embd: 32, model.scratch.vocab_size: 300}}}}
  - {{name: pt, base_model_from: base-lm, overrides: {{method: pt, spt.num_virtual_tokens: 2}}}}
  - {{name: spt, base_model_from: base-lm, overrides: {{spt.K: 2, spt.num_virtual_tokens: 2}}}}
""")
    (tmp_path / "base.yaml").write_text("train:\n  mixed_precision: 'no'\n")
    assert main(["experiment", "--config", str(exp), "--no-progress"]) == 0
    out = tmp_path / "out"
    table = (out / "comparison.md").read_text()
    assert "| pt |" in table and "| spt |" in table and "base-lm" not in table and "AVG" in table
    assert (out / "comparison.png").stat().st_size > 100
    assert len({json.loads(line)["dialogue_id"] for line in (out / "data" / "valid.jsonl").read_text().splitlines()}) \
        == 12
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"base-lm", "pt", "spt"} and timings["spt"]["train_s"] > 0
    mtime = (out / "spt" / "eval" / "metrics.json").stat().st_mtime
    capsys.readouterr()
    assert main(["experiment", "--config", str(exp), "--no-progress"]) == 0  # everything finished: skipped
    assert (out / "spt" / "eval" / "metrics.json").stat().st_mtime == mtime

    # a changed setting: finished arms are not passed off as results of the new one
    trained = (out / "base-lm" / "train_summary.json").stat().st_mtime
    capsys.readouterr()
    assert main(["experiment", "--config", str(exp), "--no-progress", "--train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "base-lm: train.max_steps (2 -> 3)" in err and "pt: its base arm base-lm is rerun" in err
    assert "--rerun-stale" in err and (out / "spt" / "eval" / "metrics.json").stat().st_mtime == mtime
    # generation settings only: with --rerun-stale the arms regenerate, nothing retrains
    assert main(["experiment", "--config", str(exp), "--no-progress", "--generate.max_new_tokens=5"]) == 2
    assert "spt (generation only): generate.max_new_tokens (4 -> 5)" in capsys.readouterr().err
    assert main(["experiment", "--config", str(exp), "--no-progress", "--generate.max_new_tokens=5",
                 "--rerun-stale"]) == 0
    assert (out / "spt" / "eval" / "metrics.json").stat().st_mtime > mtime
    assert (out / "base-lm" / "train_summary.json").stat().st_mtime == trained
    assert json.loads((out / "spt" / "arm.json").read_text())["generate"]["generate.max_new_tokens"] == 5
    assert main(["experiment", "--config", str(exp), "--no-progress", "--generate.max_new_tokens=5"]) == 0


def test_every_arm_is_validated_before_any_runs(synth_dir, tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
output_dir: {tmp_path / 'out'}
overrides: {{data.train: {synth_dir / 'train.jsonl'}}}
arms:
  - {{name: first, overrides: {{method: pt}}}}
  - {{name: typo, overrides: {{spt.KK: 2}}}}
""")
    assert main(["experiment", "--config", str(exp), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "arm typo" in err and "spt.KK" in err
    assert not (tmp_path / "out" / "first").exists()  # nothing ran


def test_bad_experiment_files(tmp_path):
    bad = tmp_path / "e.yaml"
    bad.write_text("arms: [{name: a, base_model_from: b}, {name: b}]\n")
    with pytest.raises(ConfigError, match="must name an earlier arm"):
        load_experiment(bad)
    bad.write_text("arms: []\n")
    with pytest.raises(ConfigError, match="at least one arm"):
        load_experiment(bad)
    bad.write_text("arms: [{name: a}]\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_experiment(bad)
