"""Descriptive statistics of a data set (``spt data stats``)."""

from __future__ import annotations

import math

from .data import Example


def percentiles(values: list[int], qs: tuple[int, ...] = (50, 90, 95, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles (p100 is the maximum)."""
    if not values:
        return {}
    s = sorted(values)
    return {f"p{q}": s[max(0, math.ceil(q / 100 * len(s)) - 1)] for q in qs}


def dataset_stats(examples: list[Example], tokenizer: str | None = None, max_length: int = 512) -> dict:
    personas = {p for ex in examples for p in ex.persona}
    stats: dict = {
        "dialogues": len({ex.dialogue_id for ex in examples}),
        "examples": len(examples),
        "persona_sentences": len(personas),
        "distinct_personas": len({ex.persona for ex in examples}),
        "mean_context_turns": round(sum(len(ex.context) for ex in examples) / len(examples), 2),
    }
    styles = sorted({ex.style for ex in examples if ex.style})
    if styles:
        stats["styles"] = {s: sum(ex.style == s for ex in examples) for s in styles}
    if tokenizer is None:
        stats["unit"] = "words"
        stats["response_length"] = percentiles([len(ex.response.split()) for ex in examples])
        stats["input_length"] = percentiles(
            [sum(len(t.split()) for t in (*ex.persona, *ex.context, ex.response)) for ex in examples])
        return stats
    from .format import DialogueFormatter
    from .modeling import load_tokenizer

    fmt = DialogueFormatter(load_tokenizer(tokenizer), max_length=10**9)  # measure untruncated lengths
    encoded = [fmt.encode(ex) for ex in examples]
    lengths = [len(e.input_ids) for e in encoded]
    stats["unit"] = f"tokens ({tokenizer})"
    stats["input_length"] = percentiles(lengths)
    stats["response_length"] = percentiles([len(e.input_ids) - e.prompt_len for e in encoded])
    stats[f"over_max_length_{max_length}"] = sum(n > max_length for n in lengths)
    return stats
