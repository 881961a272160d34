from collections import Counter

import pytest

from spt.data import check_split_name, parse_fractions, split_by_dialogue
from spt.data.synth import _TOPICS, FACTS, STYLES, synth_examples


def test_deterministic_under_seed():
    assert synth_examples(30, seed=3) == synth_examples(30, seed=3)
    assert synth_examples(30, seed=3) != synth_examples(30, seed=4)


def test_fact_bank_and_personas():
    assert len(FACTS) >= 200 and len(_TOPICS) >= 10
    examples = synth_examples(300, seed=0)
    assert all(3 <= len(e.persona) <= 5 for e in examples)
    assert set(Counter(e.style for e in examples)) == set(STYLES)
    assert all(e.context and e.response for e in examples)


def test_style_is_predictable_from_persona_content():
    """The majority preferred style of the persona's topics predicts the latent style well above chance."""
    topic_of = dict(FACTS)
    examples = synth_examples(500, seed=1)
    hits = 0
    for e in examples:
        votes = Counter(_TOPICS[topic_of[f]][0] for f in e.persona)
        hits += votes.most_common(1)[0][0] == e.style
    assert hits / len(examples) > 0.6  # chance is 0.25


def test_responses_use_persona_and_show_style():
    examples = synth_examples(300, seed=2)
    uses_fact = sum(any(f.rstrip(".") in e.response for f in e.persona) for e in examples)
    assert uses_fact / len(examples) > 0.95
    marks = {"enthusiastic": "!", "formal": "i must say|i would say", "casual": "lol|tbh|haha|wbu"}
    for style, pattern in marks.items():
        with_style = [e for e in examples if e.style == style]
        share = sum(any(m in e.response for m in pattern.split("|")) for e in with_style) / len(with_style)
        assert share > 0.8, style


def test_split_by_dialogue_never_shares_a_dialogue():
    examples = synth_examples(200, seed=5)
    parts = split_by_dialogue(examples, {"train": 0.8, "valid": 0.1, "test": 0.1}, seed=0)
    ids = {name: {e.dialogue_id for e in part} for name, part in parts.items()}
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])
    assert [len(v) for v in ids.values()] == [160, 20, 20]
    assert sum(len(p) for p in parts.values()) == len(examples)
    assert split_by_dialogue(examples, {"a": 1, "b": 1}, seed=9) == split_by_dialogue(examples, {"a": 1, "b": 1}, 9)


def test_parse_fractions():
    assert parse_fractions("train=0.8,valid=0.2") == {"train": 0.8, "valid": 0.2}
    with pytest.raises(ValueError, match="bad split spec 'valid'"):
        parse_fractions("train=0.8,valid")
    with pytest.raises(ValueError, match="non-negative"):
        split_by_dialogue(synth_examples(2), {"a": -1.0})


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", ".hidden", "", "a b", "x" * 101, "-a", "a\\b"])
def test_split_names_must_be_plain(name):
    with pytest.raises(ValueError, match="bad split name"):
        check_split_name(name)
    with pytest.raises(ValueError, match="bad split name"):
        split_by_dialogue(synth_examples(4), {name: 1.0, "train": 1.0})


def test_parse_fractions_refuses_repeats_and_non_finite():
    assert parse_fractions(" train.v2 = 0.5 ,valid-1_a=0.5") == {"train.v2": 0.5, "valid-1_a": 0.5}
    with pytest.raises(ValueError, match="appears twice"):
        parse_fractions("a=0.5,a=0.5")
    for spec in ("a=nan", "a=inf,b=1", "a=-0.1,b=1"):
        with pytest.raises(ValueError, match="bad split fraction"):
            parse_fractions(spec)
    with pytest.raises(ValueError, match="finite"):
        split_by_dialogue(synth_examples(4), {"a": float("inf")})
