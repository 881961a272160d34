"""Readers for the persona-dialogue formats spt understands, all producing :class:`Example`.

Formats (``--data-format`` or detected from the file):

- ``parlai``: ParlAI/ConvAI2 text (``valid_self_original_no_cands.txt`` and friends). Numbered lines;
  ``1`` starts a dialogue; ``your persona:`` / ``partner's persona:`` lines, then
  ``partner turn<TAB>response`` lines (``with_cands`` files add ``<TAB><TAB>cand|cand|...``).
- ``json``: the HuggingFace/ParlAI ``personachat_self_original.json`` layout
  ``{"train": [{"personality": [...], "utterances": [{"history": [...], "candidates": [...]}]}]}``;
  the gold response is the last candidate.
- ``spc``: Synthetic-Persona-Chat CSV (``user 1 personas``, ``user 2 personas`` and a conversation of
  ``User 1:`` / ``User 2:`` lines); every turn after the first is an example whose responder is
  that turn's speaker, with that speaker's persona.
- ``jsonl``: spt's own format, one example per line:
  ``{"persona": ["i like cats."], "context": ["hi !"], "response": "hello !"}`` with optional
  ``dialogue_id``, ``turn``, ``style``, ``partner_persona`` and ``source``.

Malformed input raises :class:`DataError` naming file, line and problem when ``strict``; otherwise
the offending dialogue (or line, where a line stands alone) is skipped, counted and logged.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from .example import DataError, Example, ReadReport

log = logging.getLogger(__name__)

Format = Literal["parlai", "json", "spc", "jsonl"]
FORMATS: tuple[str, ...] = ("parlai", "json", "spc", "jsonl")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without newline); non-UTF-8 bytes are a DataError naming the line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"not UTF-8 text (byte {e.start} of the line)") from None
            yield lineno, text.rstrip("\r\n")


def detect_format(path: str | Path) -> Format:
    """Guess the format from the file name, then from its first non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file")
    suffix = path.suffix.lower()
    by_suffix: dict[str, Format] = {".txt": "parlai", ".csv": "spc", ".jsonl": "jsonl", ".json": "json"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    for _, line in read_lines(path):
        s = line.strip()
        if not s:
            continue
        if re.match(r"^\d+ ", s):
            return "parlai"
        if s.startswith("{") and s.endswith("}"):
            return "jsonl"
        if s.startswith("{"):
            return "json"
        if "user 1 personas" in s.lower():
            return "spc"
        break
    raise DataError(path, None, f"unknown data format; pass --data-format with one of {', '.join(FORMATS)}")


def read_examples(
    path: str | Path, fmt: str | None = None, strict: bool = False, report: ReadReport | None = None
) -> list[Example]:
    """Read every example of ``path`` (format ``fmt`` or detected). Skips are logged and counted."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise DataError(path, None, f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(path, None, "no such file")
    report = report if report is not None else ReadReport()
    examples = list(READERS[fmt](path, strict, report))
    if report.skipped:
        log.warning(
            "%s: skipped %d malformed item(s) (use --strict to fail instead); first: %s",
            path, report.skipped, "; ".join(report.reasons[:3]),
        )
    if not examples:
        raise DataError(path, None, f"no examples found (format {fmt})")
    return examples


def _fail_or_skip(err: DataError, strict: bool, report: ReadReport) -> None:
    if strict:
        raise err
    report.skip(err)


# --- ParlAI / ConvAI2 text -------------------------------------------------------------------

_PARLAI_LINE = re.compile(r"^(\d+) (.*)$")


def _read_parlai(path: Path, strict: bool, report: ReadReport) -> Iterator[Example]:
    dialogue: list[tuple[int, str]] = []
    n_dialogues = 0
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        m = _PARLAI_LINE.match(line)
        if m is None:
            _fail_or_skip(DataError(path, lineno, "line does not start with a turn number"), strict, report)
            continue
        if m.group(1) == "1" and dialogue:
            yield from _parlai_dialogue(path, dialogue, n_dialogues, strict, report)
            n_dialogues += 1
            dialogue = []
        dialogue.append((lineno, m.group(2)))
    if dialogue:
        yield from _parlai_dialogue(path, dialogue, n_dialogues, strict, report)


def _parlai_dialogue(
    path: Path, lines: list[tuple[int, str]], index: int, strict: bool, report: ReadReport
) -> list[Example]:
    """One dialogue's examples, or none (counted) if any line of it is malformed and not strict."""
    persona: list[str] = []
    partner: list[str] = []
    history: list[str] = []
    out: list[Example] = []
    try:
        for lineno, text in lines:
            if text.startswith("your persona:"):
                if history:
                    raise DataError(path, lineno, "persona line after the dialogue started")
                persona.append(text[len("your persona:"):].strip())
            elif text.startswith("partner's persona:"):
                partner.append(text[len("partner's persona:"):].strip())
            else:
                fields = text.split("\t")
                if len(fields) < 2:
                    raise DataError(path, lineno, "response turn without a tab between partner turn and response")
                query, response = fields[0].strip(), fields[1].strip()
                if not response:
                    raise DataError(path, lineno, "empty response")
                if not persona:
                    raise DataError(path, lineno, "dialogue has no 'your persona:' lines (empty persona)")
                history.append(query)
                out.append(Example(
                    persona=tuple(persona), context=tuple(history), response=response,
                    dialogue_id=f"{path.name}:{index}", turn=len(out), source=str(path),
                    partner_persona=tuple(partner),
                ))
                history.append(response)
        if not out:
            raise DataError(path, lines[0][0], "dialogue has no response turns")
    except DataError as err:
        _fail_or_skip(err, strict, report)
        return []
    return out


# --- HuggingFace / ParlAI JSON ----------------------------------------------------------------

def _read_json(path: Path, strict: bool, report: ReadReport) -> Iterator[Example]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if isinstance(data, list):
        data = {"data": data}
    if not isinstance(data, dict):
        raise DataError(path, None, "expected a JSON object of splits, e.g. {\"train\": [...], \"valid\": [...]}")
    for split, dialogues in data.items():
        if not isinstance(dialogues, list):
            raise DataError(path, None, f"split {split!r} is not a list of dialogues")
        for i, dialogue in enumerate(dialogues):
            try:
                yield from _json_dialogue(path, split, i, dialogue)
            except DataError as err:
                _fail_or_skip(err, strict, report)


def _json_dialogue(path: Path, split: str, i: int, dialogue: object) -> list[Example]:
    where = f"{split}[{i}]"
    if not isinstance(dialogue, dict):
        raise DataError(path, None, f"{where}: expected an object with 'personality' and 'utterances'")
    persona = dialogue.get("personality")
    utterances = dialogue.get("utterances")
    if not isinstance(persona, list) or not persona or not all(isinstance(p, str) for p in persona):
        raise DataError(path, None, f"{where}.personality: expected a non-empty list of strings")
    if not isinstance(utterances, list):
        raise DataError(path, None, f"{where}.utterances: expected a list")
    out = []
    for t, utt in enumerate(utterances):
        cands = utt.get("candidates") if isinstance(utt, dict) else None
        history = utt.get("history") if isinstance(utt, dict) else None
        if not isinstance(cands, list) or not cands or not isinstance(cands[-1], str):
            raise DataError(path, None, f"{where}.utterances[{t}].candidates: expected a non-empty list of strings")
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise DataError(path, None, f"{where}.utterances[{t}].history: expected a list of strings")
        out.append(Example(
            persona=tuple(p.strip() for p in persona), context=tuple(h.strip() for h in history),
            response=cands[-1].strip(), dialogue_id=f"{path.name}:{split}:{i}", turn=t, source=str(path),
        ))
    return out


# --- Synthetic-Persona-Chat CSV ---------------------------------------------------------------

_SPC_TURN = re.compile(r"^[\s*]*User\s*([12])\s*[:*]+\s*(.*)$")
_SPC_STAGE = re.compile(r"^\s*(\[.*\]|\(.*\)|[\W_]*)\s*$")  # "[later]", "(pause)", "* * *"
_SPC_COLUMNS = ("user 1 personas", "user 2 personas")


def _read_spc(path: Path, strict: bool, report: ReadReport) -> Iterator[Example]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(path, line, "not UTF-8 text") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in _SPC_COLUMNS if c not in header]
    if missing or len(header) < 3:
        raise DataError(path, 1, f"not a Synthetic-Persona-Chat CSV: missing column(s) {missing or ['conversation']}")
    p1, p2 = header.index(_SPC_COLUMNS[0]), header.index(_SPC_COLUMNS[1])
    conv = next(i for i in range(len(header)) if i not in (p1, p2))
    for index, row in enumerate(reader):
        start = reader.line_num
        try:
            if len(row) != len(header):
                raise DataError(path, start, f"expected {len(header)} columns, found {len(row)}")
            personas = {1: _spc_persona(path, start, row[p1]), 2: _spc_persona(path, start, row[p2])}
            yield from _spc_examples(path, start, index, personas, row[conv], strict, report)
        except DataError as err:
            _fail_or_skip(err, strict, report)


def _spc_persona(path: Path, line: int, cell: str) -> tuple[str, ...]:
    persona = tuple(s.strip() for s in cell.splitlines() if s.strip())
    if not persona:
        raise DataError(path, line, "empty persona")
    return persona


def _spc_examples(
    path: Path, line: int, index: int, personas: dict[int, tuple[str, ...]], conversation: str,
    strict: bool, report: ReadReport,
) -> list[Example]:
    turns: list[tuple[int, str]] = []  # (speaker, text); consecutive lines of one speaker are merged
    for offset, raw in enumerate(conversation.splitlines()):
        if not raw.strip():
            continue
        m = _SPC_TURN.match(raw)
        if m is None and turns and not _SPC_STAGE.match(raw):
            turns[-1] = (turns[-1][0], f"{turns[-1][1]} {raw.strip()}")  # an utterance spanning lines
            continue
        if m is None:  # stage directions such as "* * *" or "[A few minutes later]"
            _fail_or_skip(DataError(path, line, f"conversation line {offset + 1} has no 'User 1:'/'User 2:' "
                                                f"speaker: {raw[:40]!r}"), strict, report)
            continue
        speaker, text = int(m.group(1)), m.group(2).strip()
        if turns and turns[-1][0] == speaker:
            turns[-1] = (speaker, f"{turns[-1][1]} {text}".strip())
        elif text:
            turns.append((speaker, text))
    if len(turns) < 2:
        raise DataError(path, line, "conversation has fewer than two turns")
    return [
        Example(
            persona=personas[speaker], context=tuple(t for _, t in turns[:i]), response=text,
            dialogue_id=f"{path.name}:{index}", turn=i, source=str(path),
            partner_persona=personas[3 - speaker],
        )
        for i, (speaker, text) in enumerate(turns) if i > 0
    ]


# --- spt JSONL ----------------------------------------------------------------------------------

def _read_jsonl(path: Path, strict: bool, report: ReadReport) -> Iterator[Example]:
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield _jsonl_example(path, lineno, line)
        except DataError as err:
            _fail_or_skip(err, strict, report)


def _str_list(path: Path, lineno: int, obj: dict, key: str, required: bool) -> tuple[str, ...]:
    value = obj.get(key, None if required else [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, lineno, f"field {key!r}: expected a list of strings")
    return tuple(v.strip() for v in value)


def _jsonl_example(path: Path, lineno: int, line: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, "expected a JSON object")
    persona = _str_list(path, lineno, obj, "persona", True)
    if not any(persona):
        raise DataError(path, lineno, "field 'persona': empty persona")
    response = obj.get("response")
    if not isinstance(response, str) or not response.strip():
        raise DataError(path, lineno, "field 'response': expected a non-empty string")
    style = obj.get("style")
    if style is not None and not isinstance(style, str):
        raise DataError(path, lineno, "field 'style': expected a string")
    return Example(
        persona=persona, context=_str_list(path, lineno, obj, "context", False), response=response.strip(),
        dialogue_id=str(obj.get("dialogue_id", f"{path.name}:{lineno}")), turn=int(obj.get("turn", 0)),
        source=str(obj.get("source", path)), partner_persona=_str_list(path, lineno, obj, "partner_persona", False),
        style=style,
    )


READERS: dict[str, Callable[[Path, bool, ReadReport], Iterator[Example]]] = {
    "parlai": _read_parlai, "json": _read_json, "spc": _read_spc, "jsonl": _read_jsonl,
}
