"""The benchmark scripts run end to end on a tiny model and print their ratio lines (``name: number``).

Timings on a tiny model mean nothing; what is checked is that every design runs, the exactness checks
inside the scripts pass (spt's fp32 losses equal PEFT's; spt's greedy outputs equal PEFT's without its cache)
and the output has the lines CI and the README read.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RATIO = re.compile(r"^([a-z0-9_]+): (-?[0-9.]+(?:e[+-]?\d+)?|inf|nan)$", re.M)


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def _run(module: str, argv: list[str], capsys) -> tuple[str, dict[str, float]]:
    mod = __import__(module)
    mod.main(argv)
    out = capsys.readouterr().out
    return out, {name: float(value) for name, value in RATIO.findall(out)}


def test_train_step_bench(capsys):
    out, ratios = _run("bench_train_step", ["--model", "tiny", "--in-process", "--K", "2", "--batch", "2",
                                            "--max-length", "64", "--repeat", "1", "--peak-seconds", "0.05"], capsys)
    assert "| design | precision | s/step |" in out
    for design in ("peft", "paper", "spt"):
        for precision in ("fp32", "bf16"):
            assert f"| {design} | {precision} |" in out
    for name in ("spt_fp32_vs_peft_fp32", "spt_default_vs_peft_fp32", "spt_bf16_vs_peft_bf16", "bf16_peak_fraction",
                 "fp32_peak_fraction", "loss_max_abs_diff_spt_vs_peft_fp32"):
        assert name in ratios and ratios[name] >= 0
    assert ratios["loss_max_abs_diff_spt_vs_peft_fp32"] < 1e-4  # the script fails above it, too


def test_train_step_bench_child_protocol_and_profile(capsys):
    """What a fresh process per design runs (``--child``) and the profile of spt's bf16 step."""
    import json

    import torch

    from common import PeakMemory

    out, _ = _run("bench_train_step", ["--model", "tiny", "--K", "2", "--batch", "2", "--max-length", "48",
                                       "--repeat", "1", "--child", "spt:fp32"], capsys)
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    assert result["design"] == "spt" and result["s_step"] > 0 and result["flops"] > 0 and len(result["losses"]) == 2
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem.bytes is None or mem.bytes >= 60 * 2**20
    out, ratios = _run("bench_train_step", ["--model", "tiny", "--in-process", "--designs", "spt", "--K", "2",
                                            "--batch", "2", "--max-length", "48", "--repeat", "1",
                                            "--peak-seconds", "0.05", "--profile"], capsys)
    assert "profile of spt's bf16 step" in out and "Self CPU" in out
    assert {"spt_bf16_vs_spt_fp32", "bf16_peak_fraction"} <= set(ratios)


def test_generate_bench(capsys):
    out, ratios = _run("bench_generate", ["--model", "tiny", "--batch", "4", "--K", "2,4", "--new-tokens", "4",
                                          "--max-length", "96", "--repeat", "1"], capsys)
    assert "| spt (one call, per-row prompts) |" in out
    for K in (2, 4):
        assert f"K={K}" in out
        assert ratios[f"spt_vs_peft_nocache_mismatched_rows_k{K}"] == 0  # identical greedy outputs
        assert ratios[f"spt_vs_paper_loop_k{K}"] > 0 and ratios[f"spt_tokens_per_s_k{K}"] > 0
        assert f"spt_vs_peft_cached_k{K}" in ratios or f"peft_cached_fails_k{K}" in ratios


def test_contrastive_bench(capsys):
    out, ratios = _run("bench_contrastive", ["--model", "tiny", "--batch", "8", "--max-length", "64"], capsys)
    assert "persona similarity, cold cache" in out
    assert 0 < ratios["contrastive_share_cold"] < 1 and 0 < ratios["contrastive_loss_only_share"] < 1


def test_generate_selection_hook_spreads_prompts():
    sys.path.insert(0, str(BENCH))
    import torch
    from bench_generate import spread_selection

    class Bank:
        K = 3

    bank = Bank()
    spread_selection(bank)
    assert bank.select(torch.zeros(3, 7)).tolist() == [0, 1, 2, 0, 1, 2, 0]
