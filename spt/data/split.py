"""Splitting examples by dialogue, so no dialogue is ever shared between splits."""

from __future__ import annotations

import math
import random
import re

from .example import Example

_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_split_name(name: str) -> str:
    """``name`` if it is a plain file-name stem (``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 100 characters),
    so ``DIR/<name>.jsonl`` stays inside DIR; otherwise a one-line ValueError."""
    if not _SPLIT_NAME.fullmatch(name):
        raise ValueError(f"bad split name {name!r}: a split name must be a plain name matching "
                         f"[A-Za-z0-9][A-Za-z0-9_.-]* (no '/', no leading '.'), at most 100 characters")
    return name


def _check_fractions(fractions: dict[str, float]) -> None:
    for name in fractions:
        check_split_name(name)
    values = list(fractions.values())
    if not values or any(not math.isfinite(f) or f < 0 for f in values) or sum(values) <= 0:
        raise ValueError(f"split fractions must be finite, non-negative and sum to more than 0, got {fractions}")


def split_by_dialogue(
    examples: list[Example], fractions: dict[str, float], seed: int = 0
) -> dict[str, list[Example]]:
    """Shuffle dialogue ids under ``seed`` and cut them by ``fractions`` (normalised to sum 1).

    Example order inside each split follows the input order, so dialogues stay contiguous. Split
    names must pass :func:`check_split_name`.
    """
    _check_fractions(fractions)
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
    """``"train=0.8,valid=0.1,test=0.1"`` -> {"train": 0.8, ...}; raises a one-line ValueError naming the
    bad part (not NAME=NUMBER, a name that is not a plain file name, a repeated name, a fraction that is
    negative or not finite)."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            fraction = float(value)
        except ValueError:
            raise ValueError(f"bad split spec {part!r} in {spec!r}; expected NAME=FRACTION,...") from None
        check_split_name(name)
        if name in out:
            raise ValueError(f"split {name!r} appears twice in {spec!r}")
        if not math.isfinite(fraction) or fraction < 0:
            raise ValueError(f"bad split fraction {part!r} in {spec!r}; expected a finite number >= 0")
        out[name] = fraction
    _check_fractions(out)
    return out
