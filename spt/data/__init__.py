"""Persona-dialogue data: one :class:`Example` type, readers, the synthetic generator, splits."""

from .example import DataError, Example, ReadReport, group_by_dialogue, write_jsonl, write_jsonl_files
from .readers import FORMATS, detect_format, read_examples
from .split import check_split_name, parse_fractions, split_by_dialogue

__all__ = [
    "FORMATS", "DataError", "Example", "ReadReport", "check_split_name", "detect_format", "group_by_dialogue",
    "parse_fractions", "read_examples", "split_by_dialogue", "write_jsonl", "write_jsonl_files",
]
