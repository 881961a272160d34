"""Splitting examples by dialogue, so no dialogue is ever shared between splits."""

from __future__ import annotations

import random

from .example import Example


def split_by_dialogue(
    examples: list[Example], fractions: dict[str, float], seed: int = 0
) -> dict[str, list[Example]]:
    """Shuffle dialogue ids under ``seed`` and cut them by ``fractions`` (normalised to sum 1).

    Example order inside each split follows the input order, so dialogues stay contiguous.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be non-negative and sum to more than 0, got {fractions}")
    ids = list(dict.fromkeys(ex.dialogue_id for ex in examples))
    random.Random(seed).shuffle(ids)
    total = sum(fractions.values())
    assignment: dict[str, str] = {}
    start = 0
    names = list(fractions)
    for i, name in enumerate(names):
        end = len(ids) if i == len(names) - 1 else start + round(len(ids) * fractions[name] / total)
        for dialogue_id in ids[start:end]:
            assignment[dialogue_id] = name
        start = end
    out: dict[str, list[Example]] = {name: [] for name in names}
    for ex in examples:
        out[assignment[ex.dialogue_id]].append(ex)
    return out


def parse_fractions(spec: str) -> dict[str, float]:
    """``"train=0.8,valid=0.1,test=0.1"`` -> {"train": 0.8, ...}; raises ValueError naming the bad part."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad split spec {part!r} in {spec!r}; expected NAME=FRACTION,...") from None
    return out
