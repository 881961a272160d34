import json
import math

from spt.cli import main
from spt.demo import routing_accuracy, style_prompt_nmi


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "total" in printed and "SPT beats PT on" in printed
    report = (out / "report.md").read_text()
    for section in ("## Results", "## Does the retriever route styles to prompts?", "## Samples side by side",
                    "## Loss curves", "## Time per stage"):
        assert section in report
    summary = json.loads((out / "demo_summary.json").read_text())
    for arm in ("pt", "spt"):
        assert set(summary[arm]) >= {"f1", "bleu", "rougeL", "dist1", "dist2", "ppl"}
        assert all(isinstance(v, float) and not math.isnan(v) for v in summary[arm].values())
        metrics = json.loads((out / arm / "eval" / "metrics.json").read_text())
        assert all(isinstance(metrics[k], float) for k in ("f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1",
                                                            "dist2", "ppl"))
        assert (out / arm / "eval" / "loss_curves.png").stat().st_size > 100
    by_style = json.loads((out / "spt" / "eval" / "metrics.json").read_text())["selection_by_style"]
    assert set(by_style) <= {"terse", "enthusiastic", "formal", "casual"} and sum(map(sum, by_style.values())) == 16
    assert (out / "base-lm" / "checkpoint-best" / "config.json").is_file()  # the base LM, reusable
    mtime = (out / "base-lm" / "checkpoint-best" / "model.safetensors").stat().st_mtime
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0  # second run reuses everything
    assert (out / "base-lm" / "checkpoint-best" / "model.safetensors").stat().st_mtime == mtime


def test_routing_measures():
    one_to_one = {"a": [5, 0], "b": [0, 5]}
    assert routing_accuracy(one_to_one) == 1.0 and style_prompt_nmi(one_to_one) == 1.0
    collapsed = {"a": [5, 0], "b": [5, 0]}
    assert routing_accuracy(collapsed) == 0.5 and style_prompt_nmi(collapsed) == 0.0
