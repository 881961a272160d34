"""Data parallelism for real: 2 CPU processes (gloo) launched as a user would, against one process.

Each launch costs ~15 s of process start-up on 2 cores, so these tests carry the ``distributed`` marker
and run as their own pytest call in ``make test`` (see the Makefile)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import spt.train as train_mod
from conftest import TINY_CONFIG
from spt.config import load_config, parse_overrides
from spt.pipeline import generate_file

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
# Only the LM loss: data parallelism must then reproduce one process on the same global batch exactly.
LM_ONLY = ["--spt.lambda_sel=0", "--spt.lambda_fus=0", "--spt.lambda_ctr=0", "--spt.lambda_bal=0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 *args])


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped DDP config (MULTI_GPU, which is gloo on a machine without GPUs)."""
    exe = Path(sys.executable).with_name("accelerate")
    return _run([str(exe), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
                 "--num_processes", "2", *args])


def _args(tiny_lm_dir, synth_dir, *extra) -> list[str]:
    return ["--config", TINY_CONFIG, f"--model.name_or_path={tiny_lm_dir}",
            f"--data.train={synth_dir / 'train.jsonl'}", f"--data.valid={synth_dir / 'valid.jsonl'}",
            "--train.batch_size=8", "--train.max_steps=3", "--train.lr=1e-3", *extra]


def _train_in_process(args: list[str], out: Path) -> dict[str, torch.Tensor]:
    built = []
    real = train_mod.build_method
    train_mod.build_method = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    try:
        config = args[args.index("--config") + 1]
        train_mod.train(load_config(config, parse_overrides([a for a in args if "=" in a])), out, progress=False)
    finally:
        train_mod.build_method = real
    return {k: v.detach().clone() for k, v in built[0].model.named_parameters() if v.requires_grad}


# Every method whose loss is the LM loss alone: SPT without its auxiliary losses and each baseline.
EXACT_METHODS = ["spt", "pt", "lora", "finetune"]


def test_two_processes_match_one_on_the_same_global_batch(tiny_lm_dir, synth_dir, tmp_path):
    """SPT (LM loss only) and every trained baseline, in one launch: the two replicas agree bit for bit and
    match one process on the same global batch to 1e-6 (float summation order)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_dir = tmp_path / "lm-no-dropout"  # dropout draws different masks per rank than in one process
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    lm.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    lm.save_pretrained(lm_dir)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(lm_dir)
    args = _args(lm_dir, synth_dir, *LM_ONLY, "--baseline.lora_dropout=0", "--baseline.loss_on=all")
    torchrun(str(ROOT / "tests" / "helpers" / "ddp_train.py"), str(tmp_path / "ddp"),
             ",".join([*EXACT_METHODS, "textual"]), "--", *args)
    for method in EXACT_METHODS:
        rank0, rank1 = (load_file(str(tmp_path / "ddp" / method / f"rank{r}.safetensors")) for r in (0, 1))
        single = _train_in_process([*args, f"--method={method}"], tmp_path / "single" / method)
        assert rank0.keys() == rank1.keys() == single.keys() and rank0, method
        config = load_config(TINY_CONFIG, parse_overrides([a for a in args if "=" in a] + [f"--method={method}"]))
        init = dict(train_mod.build_method(config).model.named_parameters())  # seeded: every run starts here
        moved = 0.0
        for k in rank0:
            assert torch.equal(rank0[k], rank1[k]), (method, k)
            assert torch.allclose(rank0[k], single[k], rtol=0, atol=1e-6), (method, k,
                                                                              (rank0[k] - single[k]).abs().max())
            moved = max(moved, float((init[k].detach() - single[k]).abs().max()))
        assert moved > 1e-4, method  # training moved the weights, by far more than the tolerance
    summary = json.loads((tmp_path / "ddp" / "textual" / "run" / "train_summary.json").read_text())
    assert summary["step"] == 0 and summary["best_val_loss"] > 0  # textual trains nothing; validation ran sharded


def _metric_steps(run: Path, split: str) -> list[int]:
    with (run / "metrics.csv").open() as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r["split"] == split})


def test_cli_under_accelerate_launch_trains_and_resumes(tiny_lm_dir, synth_dir, tmp_path):
    """The full SPT objective through the real CLI: per-rank auxiliary losses, checkpoints once, resume."""
    run = tmp_path / "run"
    args = _args(tiny_lm_dir, synth_dir, "--train.eval_every=2", "--no-progress")
    proc = accelerate_launch("-m", "spt.cli", "train", *args, "--output-dir", str(run))
    assert proc.stdout.count("trained 3 steps") == 1  # rank 0 reports; rank 1 is silent
    assert "2 processes: 4 rows of each batch of 8" in proc.stderr
    assert _metric_steps(run, "train") == [1, 2, 3]
    state = json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 3
    torchrun("-m", "spt.cli", "train", "--resume", str(run), "--train.max_steps=5", "--no-progress")
    assert _metric_steps(run, "train") == [1, 2, 3, 4, 5]
    assert json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 5
    # Against one process on the same global batch. The selection, fusion and balance losses are per rank
    # (on 4 rows instead of 8), so the updates differ somewhat: the prompts' (mostly LM loss) little, the
    # retriever's (selection loss only) more, but in the same direction.
    single, init = tmp_path / "single", tmp_path / "init"
    _train_in_process(_args(tiny_lm_dir, synth_dir, "--train.eval_every=2", "--train.max_steps=5"), single)
    _train_in_process(_args(tiny_lm_dir, synth_dir, "--train.max_steps=1", "--train.lr=1e-30"), init)
    two, one, start = (load_file(str(d / "checkpoint-last" / "model.safetensors")) for d in (run, single, init))
    for k in ("prompts", "retriever.normalizer.weight"):
        a, b = (two[k] - start[k]).flatten(), (one[k] - start[k]).flatten()
        rel = float((a - b).norm() / b.norm())
        cos = float(a @ b / (a.norm() * b.norm()))
        print(f"{k}: 2-process update vs 1-process: relative difference {rel:.3f}, cosine {cos:.3f}")
        assert b.norm() > 0 and cos > (0.99 if k == "prompts" else 0.5), (k, rel, cos)


def test_sharded_generate_matches_one_process(tiny_lm_dir, synth_dir, tmp_path):
    run = tmp_path / "run"
    _train_in_process(_args(tiny_lm_dir, synth_dir), run)
    data = str(synth_dir / "valid.jsonl")
    one = generate_file(run, data, tmp_path / "one.jsonl", limit=9, progress=False)  # 9: uneven shards (5 + 4)
    torchrun("-m", "spt.cli", "generate", str(run), "--data", data, "--out", str(tmp_path / "two.jsonl"),
             "--limit", "9", "--no-progress")
    rows_one = [json.loads(x) for x in one.read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(rows_one) == len(rows_two) == 9
    for a, b in zip(rows_one, rows_two, strict=True):
        assert (a["dialogue_id"], a["turn"], a["prediction"], a["prompt"]) == \
               (b["dialogue_id"], b["turn"], b["prediction"], b["prompt"])
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        assert a["ref_nll"] == pytest.approx(b["ref_nll"], abs=1e-4)
    prov = json.loads((tmp_path / "two.provenance.json").read_text())
    assert prov["examples"] == 9
