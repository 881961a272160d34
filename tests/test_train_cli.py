"""The real `spt train` CLI on a tiny model and generated data, on CPU, in seconds."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_args
from spt.cli import main
from spt.config import load_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def _args(tiny_lm_dir, synth_dir, out, *extra):
    return tiny_train_args(tiny_lm_dir, synth_dir, out, *extra)


def test_train_then_resume(tiny_lm_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out)) == 0
    for name in ("checkpoint-last", "checkpoint-best"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "config.yaml").is_file()
    assert (out / "checkpoint-last" / "trainer_state.json").is_file()
    assert (out / "checkpoint-last" / "trainer_state.safetensors").is_file()
    tensors = load_file(out / "checkpoint-last" / "model.safetensors")
    assert tensors["prompts"].shape == (2, 2, 32)  # K x n x d
    assert tensors["retriever.normalizer.weight"].shape == (32, 32)
    assert not any(k.startswith("lm.") for k in tensors)  # only what trains
    cfg = load_config(out / "checkpoint-last" / "config.yaml")
    assert cfg.model.name_or_path == str(tiny_lm_dir)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 4 and [h["step"] for h in summary["history"]] == [0, 2, 4]
    assert (out / "metrics.csv").read_text().count(",train,llm,") == 4

    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=6"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 6 and [h["step"] for h in summary["history"]] == [0, 2, 4, 6]
    resumed = load_file(out / "checkpoint-last" / "model.safetensors")
    assert not torch.equal(resumed["prompts"], tensors["prompts"])


def test_resume_matches_uninterrupted_run(tiny_lm_dir, synth_dir, tmp_path):
    """4 steps, then 2 more after resume == 6 steps straight (same data order, optimizer, schedule)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_args(tiny_lm_dir, synth_dir, straight, "--train.max_steps=6", "--train.scheduler=constant")) == 0
    assert main(_args(tiny_lm_dir, synth_dir, split, "--train.max_steps=4", "--train.scheduler=constant")) == 0
    assert main(["train", "--resume", str(split), "--no-progress", "--train.max_steps=6"]) == 0
    a = load_file(straight / "checkpoint-last" / "model.safetensors")
    b = load_file(split / "checkpoint-last" / "model.safetensors")
    assert torch.allclose(a["prompts"], b["prompts"], atol=1e-6)


def test_nonfinite_losses_are_skipped_then_stop(tiny_lm_dir, synth_dir, tmp_path, monkeypatch, capsys):
    from spt.model import SPTModel

    real_forward = SPTModel.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # one bad batch: skipped, training goes on
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SPTModel, "forward", flaky)
    assert main(_args(tiny_lm_dir, synth_dir, tmp_path / "a")) == 0
    assert "skipped_nonfinite" in (tmp_path / "a" / "metrics.csv").read_text()

    def broken(self, *a, **k):
        out = real_forward(self, *a, **k)
        out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(SPTModel, "forward", broken)
    assert main(_args(tiny_lm_dir, synth_dir, tmp_path / "b", "--train.max_bad_steps=3")) == 2
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row" in err
    # every step failed, so no checkpoint-last was written: the message must not point at one
    assert "no checkpoint was saved yet" in err and "checkpoint-last" not in err


def test_checkpoint_shape_mismatch_is_explained(tiny_lm_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=1")) == 0
    cfg_path = out / "checkpoint-last" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("num_virtual_tokens: 2", "num_virtual_tokens: 5"))
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "prompts has shape (2, 2, 32)" in err and "expects (2, 5, 32)" in err


def test_missing_model_and_data_errors(synth_dir, tmp_path, capsys):
    assert main(_args(tmp_path / "no-such-model", synth_dir, tmp_path / "r")) == 2
    assert "no-such-model': no such folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a run that fails at load leaves no folder behind
    assert main(["train", "--config", TINY, "--output-dir", str(tmp_path / "r2"), "--spt.K=-1"]) == 2
    assert "spt.K must be > 0" in capsys.readouterr().err


def test_tokenizer_without_pad_token(tiny_tokenizer, synth_dir, tmp_path):
    """GPT-2 style tokenizers ship without a pad token: pad = eos, and EOS is still trained."""
    from conftest import make_tiny_lm

    path = tmp_path / "nopad"
    tiny_tokenizer.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    make_tiny_lm("gpt2", len(tiny_tokenizer)).save_pretrained(path)
    from spt.modeling import load_tokenizer

    tok = load_tokenizer(str(path))
    assert tok.pad_token_id == tok.eos_token_id
    assert main(_args(path, synth_dir, tmp_path / "run", "--train.max_steps=1")) == 0


@pytest.mark.parametrize("bad", ["--train.mixed_precision=fp16"])
def test_fp16_on_cpu_is_refused(tiny_lm_dir, synth_dir, tmp_path, bad, capsys):
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    assert main(_args(tiny_lm_dir, synth_dir, tmp_path / "r", bad)) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
