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
    for section in ("## Results", "## Does the retriever route styles to prompts?", "## Per style",
                    "## Samples where SPT and PT differ", "## Loss curves", "## Time per stage"):
        assert section in report
    assert "| terse |" in report.split("## Per style")[1] or "| casual |" in report.split("## Per style")[1]
    summary = json.loads((out / "demo_summary.json").read_text())
    for arm in ("pt", "spt"):
        assert set(summary[arm]) >= {"f1", "bleu", "rougeL", "meteor", "dist1", "dist2", "ppl"}
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


def test_demo_data_base_style_is_independent_and_tuning_style_follows_persona(tmp_path):
    from collections import Counter

    from spt.data import read_examples
    from spt.data.synth import _TOPICS, FACTS
    from spt.demo import QUICK, write_demo_data

    base, tune = write_demo_data(tmp_path, QUICK, seed=0)
    topic_of = dict(FACTS)

    def agreement(path):  # share of speakers whose style is the majority style of their persona's topics
        rows = read_examples(path)
        votes = [Counter(_TOPICS[topic_of[f]][0] for f in r.persona).most_common(1)[0] for r in rows]
        pairs = zip(votes, rows, strict=True)
        return sum(style == r.style and n > len(r.persona) / 2 for (style, n), r in pairs) / len(rows)

    assert agreement(tune["train"]) == 1.0  # the persona decides the style, with a strict majority
    assert agreement(base["train"]) < 0.5  # drawn independently (a strict majority exists for ~60%, chance 1/4)


def test_routing_measures():
    one_to_one = {"a": [5, 0], "b": [0, 5]}
    assert routing_accuracy(one_to_one) == 1.0 and style_prompt_nmi(one_to_one) == 1.0
    collapsed = {"a": [5, 0], "b": [5, 0]}
    assert routing_accuracy(collapsed) == 0.5 and style_prompt_nmi(collapsed) == 0.0
