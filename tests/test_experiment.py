import json
from pathlib import Path

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
    assert "| pt |" in table and "| spt |" in table and "base-lm" not in table and "AVG rel. %" in table
    assert (out / "comparison.png").stat().st_size > 100
    boot = json.loads((out / "comparison.json").read_text())  # the intervals behind the table and the plot
    assert boot["resamples"] == 1000 and boot["base"] == "pt" and set(boot["intervals"]) == {"pt", "spt"}
    lo, hi = boot["intervals"]["pt"]["f1"]
    assert f"[{lo:.2f}, {hi:.2f}]" in table and "f1" in boot["differences"]["spt"]
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


@pytest.mark.parametrize("text, error", [
    ("arms: [{name: a, base_model_from: b}, {name: b}]\n", "must name an earlier arm"),
    ("arms: []\n", "at least one arm"),
    ("arms: [{name: a}]\nbogus: 1\n", "unknown key"),
    ("split: {source: a.txt, synth: {}}\narms: [{name: a}]\n", "either source"),
    ("split: {synth: {}, fraction: x}\narms: [{name: a}]\n", "unknown key"),
    ("bootstrap: -1\narms: [{name: a}]\n", "bootstrap"),
])
def test_bad_experiment_files(tmp_path, text, error):
    bad = tmp_path / "e.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_experiment(bad)


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_cpu_experiment_runs_on_the_demo_corpus_with_nothing_from_shared(tmp_path, monkeypatch, capsys):
    """experiments/cpu-mini.yaml needs nothing outside a clone: the demo's synthetic corpus, split as the demo
    splits it, and a base LM trained from scratch; --dry-run validates every arm without training."""
    import dataclasses

    from spt.demo import FULL, write_demo_data

    monkeypatch.chdir(tmp_path)  # not the repository: no ../shared next to it
    out = tmp_path / "cpu"
    assert main(["experiment", "--config", str(EXPERIMENTS / "cpu-mini.yaml"), "--output-dir", str(out),
                 "--dry-run"]) == 0
    plan = capsys.readouterr().out
    for arm, method in (("base-lm", "finetune (not compared)"), ("textual", "textual"), ("finetune", "finetune"),
                        ("lora", "lora"), ("pt", "pt"), ("spt", "spt")):
        assert f"| {arm} | {method} |" in plan
    assert "| base-lm | finetune (not compared) | from scratch | 400 | to run |" in plan
    assert "| spt | spt | arm base-lm | 300 | to run |" in plan and "shared" not in plan
    assert not (out / "base-lm").exists()  # nothing trained
    _, demo = write_demo_data(tmp_path / "demo", dataclasses.replace(FULL, base_dialogues=1), seed=0)
    for split in ("train", "valid", "test"):  # the demo's own tuning data
        assert (out / "data" / f"{split}.jsonl").read_bytes() == demo[split].read_bytes()
        assert f"data.{split}: {out / 'data' / split}.jsonl" in plan
    for name in ("cpu-mini", "routing-ablation-mini", "paper-opt125m"):  # every shipped file still loads
        assert load_experiment(EXPERIMENTS / f"{name}.yaml").arms


PERSONACHAT_LINES = """1 your persona: i read twenty books a year.
2 your persona: i only eat kosher.
3 hello what are doing today ?\ti am good , i just got off work .
4 i just got done watching a horror movie\ti rather read , i've read about 20 books this year .
1 your persona: i have two dogs.
2 your persona: i love hiking.
3 hi ! any pets ?\tyes , two dogs . we hike every weekend .
4 where do you hike ?\tin the hills near my house .
"""


def test_experiment_data_option_takes_personachat_files_and_folders(synth_dir, tmp_path, capsys):
    pc = tmp_path / "personachat"
    pc.mkdir()
    (pc / "valid_self_original_no_cands.txt").write_text(PERSONACHAT_LINES * 5)
    exp, out = EXPERIMENTS / "cpu-mini.yaml", tmp_path / "out"
    assert main(["experiment", "--config", str(exp), "--output-dir", str(out), "--dry-run"]) == 0
    synthetic = (out / "data" / "train.jsonl").read_text()
    capsys.readouterr()
    # PersonaChat's valid file alone: split by dialogue, and the split is made again from it
    assert main(["experiment", "--config", str(exp), "--output-dir", str(out), "--dry-run", "--data", str(pc)]) == 0
    train = (out / "data" / "train.jsonl").read_text()
    assert train != synthetic and "i read twenty books a year." in train + (out / "data" / "test.jsonl").read_text()
    record = json.loads((out / "data" / "split.json").read_text())
    assert record["source"] == str((pc / "valid_self_original_no_cands.txt").resolve())
    assert record["fractions"] == {"train": 0.8, "valid": 0.1, "test": 0.1}
    # train and valid files in a folder are used as they are; a file is split
    capsys.readouterr()
    assert main(["experiment", "--config", str(exp), "--output-dir", str(out), "--dry-run",
                 "--data", str(synth_dir)]) == 0
    assert f"data.train: {synth_dir / 'train.jsonl'}" in capsys.readouterr().out
    (pc / "train_self_original_no_cands.txt").write_text(PERSONACHAT_LINES)  # PersonaChat's train and valid
    assert main(["experiment", "--config", str(exp), "--output-dir", str(out), "--dry-run", "--data", str(pc)]) == 0
    assert f"data.train: {pc / 'train_self_original_no_cands.txt'}" in capsys.readouterr().out
    assert main(["experiment", "--config", str(exp), "--output-dir", str(out), "--dry-run",
                 "--data", str(pc / "train_self_original_no_cands.txt")]) == 0
    assert json.loads((out / "data" / "split.json").read_text())["source"].endswith("train_self_original_no_cands.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["experiment", "--config", str(exp), "--output-dir", str(out), "--dry-run", "--data", str(empty)]) == 2
    assert "no data found in this folder" in capsys.readouterr().err


