"""Persona-dialogue data: one :class:`Example` type, readers, the synthetic generator, splits."""

from .example import DataError, Example, ReadReport, group_by_dialogue, write_jsonl
from .readers import FORMATS, detect_format, read_examples
from .split import parse_fractions, split_by_dialogue

__all__ = [
    "FORMATS", "DataError", "Example", "ReadReport", "detect_format", "group_by_dialogue",
    "parse_fractions", "read_examples", "split_by_dialogue", "write_jsonl",
]
