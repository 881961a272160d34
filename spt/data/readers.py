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
  ``dialogue_id``, ``turn``, ``style``, ``partner_persona`` and ``source``. ``null`` in an optional
  field means the field is absent; a record without a ``dialogue_id`` is a dialogue of its own.

All files are UTF-8; a leading byte-order mark is ignored. Any other encoding (Latin-1, UTF-16) is a
:class:`DataError` naming the line.

Malformed input raises :class:`DataError` naming file, line (or field) and problem when ``strict``;
otherwise the offending dialogue (or line, where a line stands alone) is skipped, counted and
logged. Problems that make the whole file unreadable (wrong encoding, a JSON file that does not
parse, a CSV without the expected columns, no examples at all) are a :class:`DataError` either way.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from .example import DataError, Example, ReadReport

log = logging.getLogger(__name__)

Format = Literal["parlai", "json", "spc", "jsonl"]
FORMATS: tuple[str, ...] = ("parlai", "json", "spc", "jsonl")
_BOM = "\ufeff"


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without newline); non-UTF-8 bytes are a DataError naming the line.

    A UTF-8 byte-order mark at the start of the file is dropped."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"not UTF-8 text (byte {e.start} of the line)") from None
            if lineno == 1:
                text = text.removeprefix(_BOM)
            yield lineno, text.rstrip("\r\n")


def _decode(path: Path, data: bytes) -> str:
    """The whole file as text (UTF-8, byte-order mark dropped); bad bytes are a DataError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, f"not UTF-8 text (byte {e.start - line_start} of the line)") from None


def _check_text(path: Path, line: int | None, field: str, text: str) -> str:
    """``text`` if it can be written as UTF-8 (JSON's "\\ud800" escapes give lone surrogates, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(path, line, f"{field}: not valid Unicode text (lone surrogate at character {e.start})") \
            from None
    return text


def detect_format(path: str | Path) -> Format:
    """Guess the format from the file name, then from its first non-empty line."""
    path = Path(path)
    _check_input(path)
    suffix = path.suffix.lower()
    by_suffix: dict[str, Format] = {".txt": "parlai", ".csv": "spc", ".jsonl": "jsonl", ".json": "json"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    try:
        for _, line in read_lines(path):
            s = line.strip()
            if not s:
                continue
            if re.match(r"^[0-9]+ ", s):
                return "parlai"
            if s.startswith("{") and s.endswith("}"):
                return "jsonl"
            if s.startswith("{"):
                return "json"
            if "user 1 personas" in s.lower():
                return "spc"
            break
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror or e}") from None
    raise DataError(path, None, f"unknown data format; pass --data-format with one of {', '.join(FORMATS)}")


def _check_input(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "no such file")
    if not path.is_file():
        raise DataError(path, None, "not a regular file (a folder?)")


def read_examples(
    path: str | Path, fmt: str | None = None, strict: bool = False, report: ReadReport | None = None
) -> list[Example]:
    """Read every example of ``path`` (format ``fmt`` or detected). Skips are logged and counted.

    Raises :class:`DataError` (one line: file, line or field, problem) when the file cannot be read
    as a whole, when ``strict`` and an item is malformed, or when no example is left."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise DataError(path, None, f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _check_input(path)
    report = report if report is not None else ReadReport()
    try:
        examples = list(READERS[fmt](path, strict, report))
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror or e}") from None
    if not examples:  # the error says what was skipped: one line, no warning before it
        skipped = f"; skipped {report.skipped} malformed item(s), first: {report.reasons[0]}" if report.skipped else ""
        raise DataError(path, None, f"no examples found (format {fmt}){skipped}")
    if report.skipped:
        log.warning(
            "%s: skipped %d malformed item(s) (use --strict to fail instead); first: %s",
            path, report.skipped, "; ".join(report.reasons[:3]),
        )
    return examples


def _fail_or_skip(err: DataError, strict: bool, report: ReadReport) -> None:
    if strict:
        raise err
    report.skip(err)


# --- ParlAI / ConvAI2 text -------------------------------------------------------------------

_PARLAI_LINE = re.compile(r"^([0-9]+) (.*)$")


def _read_parlai(path: Path, strict: bool, report: ReadReport) -> Iterator[Example]:
    """A line without a turn number drops its whole dialogue (counted), since every later context of
    that dialogue would silently miss the exchange; before the first dialogue it is skipped alone."""
    dialogue: list[tuple[int, str]] = []
    broken: DataError | None = None  # the first unnumbered line of the current dialogue
    n_dialogues = 0
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        m = _PARLAI_LINE.match(line)
        if m is None:
            err = DataError(path, lineno, "line does not start with a turn number")
            if not dialogue:
                _fail_or_skip(err, strict, report)
            elif strict:
                raise err
            elif broken is None:
                broken = err
            continue
        if m.group(1) == "1" and dialogue:
            yield from _parlai_dialogue(path, dialogue, n_dialogues, strict, report, broken)
            n_dialogues += 1
            dialogue, broken = [], None
        dialogue.append((lineno, m.group(2)))
    if dialogue:
        yield from _parlai_dialogue(path, dialogue, n_dialogues, strict, report, broken)


def _parlai_dialogue(
    path: Path, lines: list[tuple[int, str]], index: int, strict: bool, report: ReadReport,
    broken: DataError | None = None,
) -> list[Example]:
    """One dialogue's examples, or none (counted) if any line of it is malformed and not strict."""
    if broken is not None:
        report.skip(DataError(path, broken.line, f"{broken.problem}; dropped its whole dialogue "
                                                 f"(lines {lines[0][0]}-{lines[-1][0]})"))
        return []
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
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(path, None, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(path, None, f"invalid JSON: {e}") from None
    if isinstance(data, list):
        data = {"data": data}
    if not isinstance(data, dict):
        raise DataError(path, None, "expected a JSON object of splits, e.g. {\"train\": [...], \"valid\": [...]}")
    for split, dialogues in data.items():
        if not isinstance(dialogues, list):
            raise DataError(path, None, f"split {split!r}: expected a list of dialogues")
        for i, dialogue in enumerate(dialogues):
            try:
                yield from _json_dialogue(path, split, i, dialogue)
            except DataError as err:
                _fail_or_skip(err, strict, report)


def _json_dialogue(path: Path, split: str, i: int, dialogue: object) -> list[Example]:
    where = f"{split if split.isidentifier() else repr(split)}[{i}]"
    if not isinstance(dialogue, dict):
        raise DataError(path, None, f"{where}: expected an object with 'personality' and 'utterances'")
    persona = dialogue.get("personality")
    utterances = dialogue.get("utterances")
    if not isinstance(persona, list) or not all(isinstance(p, str) for p in persona) \
            or not any(p.strip() for p in persona):
        raise DataError(path, None, f"{where}.personality: expected a non-empty list of strings")
    for p in persona:
        _check_text(path, None, f"{where}.personality", p)
    if not isinstance(utterances, list):
        raise DataError(path, None, f"{where}.utterances: expected a list")
    out = []
    for t, utt in enumerate(utterances):
        cands = utt.get("candidates") if isinstance(utt, dict) else None
        history = utt.get("history") if isinstance(utt, dict) else None
        field = f"{where}.utterances[{t}]"
        if not isinstance(cands, list) or not cands or not isinstance(cands[-1], str):
            raise DataError(path, None, f"{field}.candidates: expected a non-empty list of strings")
        if not cands[-1].strip():
            raise DataError(path, None, f"{field}.candidates: the last candidate (the response) is empty")
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise DataError(path, None, f"{field}.history: expected a list of strings")
        _check_text(path, None, f"{field}.candidates", cands[-1])
        for h in history:
            _check_text(path, None, f"{field}.history", h)
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
    text = _decode(path, path.read_bytes())
    rows = _csv_rows(text)
    first = rows[0][1] if rows else []
    if isinstance(first, csv.Error):
        raise DataError(path, rows[0][0], f"invalid CSV header: {first}")
    header = [h.strip().lower() for h in first]
    missing = [c for c in _SPC_COLUMNS if c not in header]
    if missing or len(header) < 3:
        raise DataError(path, 1, f"not a Synthetic-Persona-Chat CSV: missing column(s) {missing or ['conversation']}")
    p1, p2 = header.index(_SPC_COLUMNS[0]), header.index(_SPC_COLUMNS[1])
    conv = next(i for i in range(len(header)) if i not in (p1, p2))
    for index, (line, row) in enumerate(rows[1:]):
        try:
            if isinstance(row, csv.Error):
                raise DataError(path, line, f"invalid CSV row: {row}")
            if len(row) != len(header):
                raise DataError(path, line, f"expected {len(header)} columns, found {len(row)}")
            personas = {1: _spc_persona(path, line, row[p1]), 2: _spc_persona(path, line, row[p2])}
            yield from _spc_examples(path, line, index, personas, row[conv], strict, report)
        except DataError as err:
            _fail_or_skip(err, strict, report)


def _csv_rows(text: str) -> list[tuple[int, list[str] | csv.Error]]:
    """(line number of the row's last line, its fields or the csv error that ended it) for every row.

    Quoting is strict, so an unbalanced quote is an error at its line instead of a field that swallows
    the rest of the file. The csv module's field size limit (128 KiB) is lifted while reading, since the
    whole file is in memory anyway."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str] | csv.Error]] = []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        while True:
            try:
                row: list[str] | csv.Error = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                row = e
            rows.append((reader.line_num, row))
    finally:
        csv.field_size_limit(limit)
    return rows


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
    value = obj.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, lineno, f"field {key!r}: expected a list of strings")
    return tuple(_check_text(path, lineno, f"field {key!r}", v).strip() for v in value)


def _opt_str(path: Path, lineno: int, obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(path, lineno, f"field {key!r}: expected a string")
    return None if value is None else _check_text(path, lineno, f"field {key!r}", value)


def parse_json_line(path: Path, lineno: int, line: str) -> Any:
    """One line of a JSONL file, or a DataError naming file:line (bad JSON, too deep, huge integers)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(path, lineno, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(path, lineno, f"invalid JSON: {str(e).split(';')[0][:120]}") from None


def _jsonl_example(path: Path, lineno: int, line: str) -> Example:
    """One JSONL record. JSON ``null`` in an optional field means the field is absent. A record without
    a ``dialogue_id`` (absent, null or "") is a dialogue of its own (id ``FILE:LINE``), so records
    missing their id never merge into one dialogue. ``dialogue_id`` may be a string or an integer;
    ``turn`` a non-negative integer (or a string of digits)."""
    obj = parse_json_line(path, lineno, line)
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected a JSON object, found {type(obj).__name__}")
    persona = _str_list(path, lineno, obj, "persona", True)
    if not any(persona):
        raise DataError(path, lineno, "field 'persona': empty persona")
    response = _opt_str(path, lineno, obj, "response")
    if response is None or not response.strip():
        raise DataError(path, lineno, "field 'response': expected a non-empty string")
    dialogue_id = obj.get("dialogue_id")
    if isinstance(dialogue_id, bool) or not isinstance(dialogue_id, str | int | None):
        raise DataError(path, lineno, "field 'dialogue_id': expected a string or an integer")
    dialogue_id = _check_text(path, lineno, "field 'dialogue_id'", str(dialogue_id)) \
        if dialogue_id is not None and str(dialogue_id).strip() else f"{path.name}:{lineno}"
    turn = obj.get("turn")
    if isinstance(turn, str) and turn.isascii() and turn.isdigit() and len(turn) <= 18:
        turn = int(turn)
    if turn is not None and (isinstance(turn, bool) or not isinstance(turn, int) or turn < 0):
        raise DataError(path, lineno, f"field 'turn': expected a non-negative integer, found {json.dumps(turn)[:40]}")
    source = _opt_str(path, lineno, obj, "source")
    return Example(
        persona=persona, context=_str_list(path, lineno, obj, "context", False), response=response.strip(),
        dialogue_id=dialogue_id, turn=turn or 0, source=str(path) if source is None else source,
        partner_persona=_str_list(path, lineno, obj, "partner_persona", False),
        style=_opt_str(path, lineno, obj, "style"),
    )


READERS: dict[str, Callable[[Path, bool, ReadReport], Iterator[Example]]] = {
    "parlai": _read_parlai, "json": _read_json, "spc": _read_spc, "jsonl": _read_jsonl,
}
