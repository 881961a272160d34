"""Hostile input for every reader and for ``spt data stats|split|convert``.

Each case of the table is a file that is either rejected or read with counted skips:

- rejected: ``read_examples`` raises a one-line DataError, and every command exits 2 with ONE line on
  stderr (``spt: error: FILE[:LINE]: ...``) naming the file and the line or field, no traceback;
- accepted: the examples that are left are read, the skips are counted (``stats`` reports them, a
  warning names the first), ``--strict`` turns the first skip into a one-line error naming file, line
  and field, and ``split``/``convert`` write exactly those examples.

Either way no partial or temp file is left in the output folder. The commands run in-process (fast);
a few cases that used to end in tracebacks also run as real processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from spt.cli import main
from spt.data import DataError, Example, ReadReport, read_examples, write_jsonl, write_jsonl_files

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


@dataclass(frozen=True)
class Case:
    id: str
    name: str  # input file name; its suffix picks the reader unless fmt is given
    data: bytes
    examples: int = 0  # accepted: examples read
    skipped: int = 0  # accepted: items skipped and counted
    error: str | None = None  # rejected: regex the one-line error must match (file and line or field)
    strict_error: str | None = None  # accepted with skips: regex of the one-line --strict error
    fmt: str | None = None
    dialogues: int | None = None  # accepted: distinct dialogues, where it matters
    check: Callable[[list[Example]], bool] | None = None  # accepted: anything else to assert on the examples

    def __post_init__(self):
        assert (self.error is None) == (self.examples > 0), self.id
        assert (self.strict_error is not None) == (self.skipped > 0), self.id


# --- builders -----------------------------------------------------------------------------------

def rec(i: int = 0, **fields) -> dict:
    r = {"persona": [f"i like cats {i}."], "context": ["hi"], "response": f"hello {i} !", "dialogue_id": f"d{i}"}
    r.update(fields)
    return {k: v for k, v in r.items() if v is not ...}  # ... removes a field


def jl(*lines) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def bad(**fields) -> bytes:
    """Three records, the middle one (line 2) with ``fields`` changed."""
    return jl(rec(0), rec(1, **fields), rec(2))


def hf(*dialogues, split: str = "train") -> bytes:
    return json.dumps({split: list(dialogues)}).encode()


def dlg(persona=("i like cats.",), utterances=None) -> dict:
    utterances = utterances if utterances is not None else [
        {"history": ["hi"], "candidates": ["no", "hello !"]},
        {"history": ["hi", "hello !", "cats ?"], "candidates": ["yes i love cats ."]}]
    return {"personality": list(persona), "utterances": utterances}


PARLAI_OK = "1 your persona: i like cats.\n2 your persona: i ski.\n3 hi\thello !\n4 cats ?\tyes .\n"
SPC_HEAD = "user 1 personas,user 2 personas,Best Generated Conversation\n"
SPC_ROW = '"i like cats.\ni ski.","i am a boy.","User 1: hi\nUser 2: hello !\nUser 1: cats ?"\n'  # 2 examples


def spc(*rows: str) -> bytes:
    return (SPC_HEAD + "".join(rows)).encode()


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xd8\xff\xe0" * 8
DEEP = "[" * 100_000
HUGE_PERSONA = [f"i like thing number {i}." for i in range(20_000)]
LONG_RESPONSE = "and so on " * 10_000  # ~100 000 characters

CASES = [
    # ---- jsonl: encodings and bytes ----
    Case("jsonl-empty", "d.jsonl", b"", error=r"d\.jsonl: no examples found"),
    Case("jsonl-blank-lines", "d.jsonl", b"\n \n\t\n", error=r"d\.jsonl: no examples found"),
    Case("jsonl-binary", "d.jsonl", BINARY, error=r"d\.jsonl:1: not UTF-8"),
    Case("jsonl-control-bytes", "d.jsonl", b"\x00\x01\x02\n\x7f\x1b[2J\n",
         error=r"d\.jsonl: no examples found .*skipped 2 .*d\.jsonl:1: invalid JSON"),
    Case("jsonl-latin1", "d.jsonl", jl(rec(0)) + '{"persona": ["café."], "response": "oui"}\n'.encode("latin-1"),
         error=r"d\.jsonl:2: not UTF-8"),
    Case("jsonl-utf16", "d.jsonl", jl(rec(0)).decode().encode("utf-16"), error=r"d\.jsonl:1: not UTF-8"),
    Case("jsonl-bom", "d.jsonl", b"\xef\xbb\xbf" + jl(rec(0), rec(1)), examples=2),
    Case("jsonl-crlf", "d.jsonl", jl(rec(0), rec(1)).replace(b"\n", b"\r\n"), examples=2),
    Case("jsonl-1mb-garbage-line", "d.jsonl", jl(rec(0), "x" * MB, rec(2)), examples=2, skipped=1,
         strict_error=r"d\.jsonl:2: invalid JSON"),
    Case("jsonl-1mb-context", "d.jsonl", jl(rec(0, context=["word " * (MB // 5)]), rec(1)), examples=2),
    Case("jsonl-huge-persona", "d.jsonl", jl(rec(0, persona=HUGE_PERSONA), rec(1)), examples=2,
         check=lambda exs: len(exs[0].persona) == 20_000),
    Case("jsonl-long-response", "d.jsonl", jl(rec(0, response=LONG_RESPONSE), rec(1)), examples=2,
         check=lambda exs: exs[0].response == LONG_RESPONSE.strip()),
    Case("jsonl-deep-nesting", "d.jsonl", jl(rec(0), '{"persona": ' + DEEP, rec(2)), examples=2, skipped=1,
         strict_error=r"d\.jsonl:2: invalid JSON: nested too deeply"),
    Case("jsonl-5000-digit-number", "d.jsonl", jl(rec(0), '{"persona": ["a."], "response": "b", "turn": '
                                                   + "7" * 5000 + "}", rec(2)),
         examples=2, skipped=1, strict_error=r"d\.jsonl:2: invalid JSON: .*digits"),
    # ---- jsonl: wrong JSON shapes ----
    Case("jsonl-number", "d.jsonl", jl(rec(0), "42", rec(2)), examples=2, skipped=1,
         strict_error=r"d\.jsonl:2: expected a JSON object, found int"),
    Case("jsonl-list", "d.jsonl", jl(rec(0), [rec(1)], rec(2)), examples=2, skipped=1,
         strict_error=r"d\.jsonl:2: expected a JSON object, found list"),
    Case("jsonl-string", "d.jsonl", jl(rec(0), '"i like cats."', rec(2)), examples=2, skipped=1,
         strict_error=r"d\.jsonl:2: expected a JSON object, found str"),
    Case("jsonl-null", "d.jsonl", jl(rec(0), "null", rec(2)), examples=2, skipped=1,
         strict_error=r"d\.jsonl:2: expected a JSON object"),
    Case("jsonl-all-lines-bad", "d.jsonl", jl("1", "[]", '"x"'),
         error=r"d\.jsonl: no examples found \(format jsonl\); skipped 3 .*d\.jsonl:1: expected a JSON object"),
    # ---- jsonl: each field missing or of the wrong type (line 2 of 3) ----
    *[Case(f"jsonl-{field}-{label}", "d.jsonl", bad(**{field: value}), examples=2, skipped=1,
           strict_error=rf"d\.jsonl:2: field '{field}'")
      for field, label, value in [
          ("persona", "missing", ...), ("persona", "null", None), ("persona", "string", "i like cats."),
          ("persona", "number", 3), ("persona", "list-of-numbers", [1, 2]), ("persona", "empty", []),
          ("persona", "blank", ["", "  "]), ("persona", "object", {"a": "b"}),
          ("context", "string", "hi"), ("context", "number", 1), ("context", "list-with-null", ["hi", None]),
          ("response", "missing", ...), ("response", "null", None), ("response", "number", 3),
          ("response", "list", ["hello"]), ("response", "blank", "   "),
          ("response", "lone-surrogate", "\ud800 hello"),
          ("partner_persona", "string", "i ski."), ("partner_persona", "list-of-numbers", [1]),
          ("style", "number", 1), ("style", "list", ["terse"]),
          ("source", "number", 7), ("source", "object", {}),
          ("dialogue_id", "list", ["d"]), ("dialogue_id", "bool", True), ("dialogue_id", "float", 1.5),
          ("dialogue_id", "object", {"id": 1}),
          ("turn", "word", "abc"), ("turn", "negative", -1), ("turn", "float", 1.5), ("turn", "bool", True),
          ("turn", "list", [1]), ("turn", "huge-string", "9" * 40),
      ]],
    # ---- jsonl: null means absent in optional fields; a null dialogue_id never merges dialogues ----
    Case("jsonl-turn-null", "d.jsonl", bad(turn=None), examples=3, check=lambda exs: exs[1].turn == 0),
    Case("jsonl-turn-digits", "d.jsonl", bad(turn="4"), examples=3, check=lambda exs: exs[1].turn == 4),
    Case("jsonl-context-null", "d.jsonl", bad(context=None), examples=3, check=lambda exs: exs[1].context == ()),
    Case("jsonl-style-source-partner-null", "d.jsonl", bad(style=None, source=None, partner_persona=None),
         examples=3, check=lambda exs: exs[1].style is None and exs[1].source.endswith("d.jsonl")),
    Case("jsonl-dialogue-id-null", "d.jsonl", jl(*(rec(i, dialogue_id=None) for i in range(4))), examples=4,
         dialogues=4, check=lambda exs: [e.dialogue_id for e in exs] == [f"d.jsonl:{i}" for i in range(1, 5)]),
    Case("jsonl-dialogue-id-missing-or-blank", "d.jsonl", jl(rec(0, dialogue_id=...), rec(1, dialogue_id=""),
                                                             rec(2, dialogue_id=" ")), examples=3, dialogues=3),
    Case("jsonl-dialogue-id-int", "d.jsonl", jl(rec(0, dialogue_id=7), rec(1, dialogue_id=7), rec(2, dialogue_id=8)),
         examples=3, dialogues=2, check=lambda exs: exs[0].dialogue_id == "7"),
    # ---- parlai ----
    Case("parlai-empty", "d.txt", b"", error=r"d\.txt: no examples found"),
    Case("parlai-binary", "d.txt", BINARY, error=r"d\.txt:1: not UTF-8"),
    Case("parlai-latin1", "d.txt", "1 your persona: i like café.\n2 hi\toui\n".encode("latin-1"),
         error=r"d\.txt:1: not UTF-8"),
    Case("parlai-utf16", "d.txt", PARLAI_OK.encode("utf-16"), error=r"d\.txt:1: not UTF-8"),
    Case("parlai-bom", "d.txt", b"\xef\xbb\xbf" + PARLAI_OK.encode(), examples=2,
         check=lambda exs: exs[0].persona == ("i like cats.", "i ski.")),
    Case("parlai-crlf", "d.txt", PARLAI_OK.replace("\n", "\r\n").encode(), examples=2,
         check=lambda exs: exs[1].context == ("hi", "hello !", "cats ?")),
    Case("parlai-unnumbered-line-in-dialogue", "d.txt",
         ("1 your persona: a.\n2 hi\thello\nstray line\n3 how are you\tfine\n" + PARLAI_OK).encode(),
         examples=2, skipped=1, strict_error=r"d\.txt:3: line does not start with a turn number",
         check=lambda exs: all(e.persona == ("i like cats.", "i ski.") for e in exs)),
    Case("parlai-unnumbered-line-before-first-dialogue", "d.txt", ("garbage\n" + PARLAI_OK).encode(),
         examples=2, skipped=1, strict_error=r"d\.txt:1: line does not start with a turn number"),
    Case("parlai-non-ascii-digit", "d.txt", ("1 your persona: a.\n\u0662 hi\thello\n" + PARLAI_OK).encode(),
         examples=2, skipped=1, strict_error=r"d\.txt:2: line does not start with a turn number"),
    Case("parlai-missing-tab", "d.txt", ("1 your persona: a.\n2 no tab\n" + PARLAI_OK).encode(), examples=2,
         skipped=1, strict_error=r"d\.txt:2: response turn without a tab"),
    Case("parlai-empty-response", "d.txt", ("1 your persona: a.\n2 hi\t \n" + PARLAI_OK).encode(), examples=2,
         skipped=1, strict_error=r"d\.txt:2: empty response"),
    Case("parlai-no-persona", "d.txt", ("1 hi\thello\n" + PARLAI_OK).encode(), examples=2, skipped=1,
         strict_error=r"d\.txt:1: dialogue has no 'your persona:' lines"),
    Case("parlai-only-personas", "d.txt", b"1 your persona: a.\n2 your persona: b.\n",
         error=r"d\.txt: no examples found .*d\.txt:1: dialogue has no response turns"),
    Case("parlai-1mb-line", "d.txt", ("1 your persona: a.\n2 " + "word " * (MB // 5) + "\thello\n").encode(),
         examples=1),
    Case("parlai-huge-persona", "d.txt", ("".join(f"{i + 1} your persona: i like thing {i}.\n" for i in range(5000))
                                          + "5001 hi\thello\n").encode(), examples=1,
         check=lambda exs: len(exs[0].persona) == 5000),
    Case("parlai-long-response", "d.txt", f"1 your persona: a.\n2 hi\t{LONG_RESPONSE}\n".encode(), examples=1),
    Case("parlai-read-as-jsonl", "d.txt", PARLAI_OK.encode(), fmt="jsonl",
         error=r"d\.txt: no examples found \(format jsonl\); skipped 4 .*d\.txt:1: invalid JSON"),
    Case("jsonl-read-as-parlai", "d.jsonl", jl(rec(0), rec(1)), fmt="parlai",
         error=r"d\.jsonl: no examples found \(format parlai\); skipped 2 .*d\.jsonl:1: line does not start"),
    # ---- json (HuggingFace layout) ----
    Case("json-empty", "d.json", b"", error=r"d\.json:1: invalid JSON"),
    Case("json-binary", "d.json", BINARY, error=r"d\.json:1: not UTF-8"),
    Case("json-latin1", "d.json", hf(dlg(("café",))).decode().replace("\\u00e9", "é").encode("latin-1"),
         error=r"d\.json:1: not UTF-8"),
    Case("json-utf16", "d.json", hf(dlg()).decode().encode("utf-16"), error=r"d\.json:1: not UTF-8"),
    Case("json-bom", "d.json", b"\xef\xbb\xbf" + hf(dlg()), examples=2),
    Case("json-truncated", "d.json", b'{"train": [\n{"personality": ', error=r"d\.json:2: invalid JSON"),
    Case("json-number", "d.json", b"42", error=r"d\.json: expected a JSON object of splits"),
    Case("json-string", "d.json", b'"hello"', error=r"d\.json: expected a JSON object of splits"),
    Case("json-null", "d.json", b"null", error=r"d\.json: expected a JSON object of splits"),
    Case("json-split-not-a-list", "d.json", b'{"train": 5}', error=r"d\.json: split 'train': expected a list"),
    Case("json-deep-nesting", "d.json", DEEP.encode(), error=r"d\.json: invalid JSON: nested too deeply"),
    Case("json-list-of-mixed", "d.json", json.dumps([dlg(), 1, "x", None]).encode(), examples=2, skipped=3,
         strict_error=r"d\.json: data\[1\]: expected an object with 'personality'"),
    *[Case(f"json-{label}", "d.json", hf(dlg(), value), examples=2, skipped=1,
           strict_error=rf"d\.json: train\[1\]\.{field}")
      for label, field, value in [
          ("personality-string", "personality", {"personality": "i ski.", "utterances": []}),
          ("personality-missing", "personality", {"utterances": []}),
          ("personality-blank", "personality", dlg(("",))),
          ("personality-numbers", "personality", dlg((1, 2))),
          ("utterances-missing", "utterances", {"personality": ["a."]}),
          ("utterances-object", "utterances", {"personality": ["a."], "utterances": {"history": []}}),
          ("utterance-string", r"utterances\[0\]\.candidates", dlg(utterances=["hi"])),
          ("candidates-missing", r"utterances\[0\]\.candidates", dlg(utterances=[{"history": []}])),
          ("candidates-empty", r"utterances\[0\]\.candidates", dlg(utterances=[{"history": [], "candidates": []}])),
          ("candidates-number", r"utterances\[0\]\.candidates", dlg(utterances=[{"history": [], "candidates": [5]}])),
          ("response-blank", r"utterances\[0\]\.candidates: the last candidate",
           dlg(utterances=[{"history": [], "candidates": ["a", " "]}])),
          ("response-lone-surrogate", r"utterances\[0\]\.candidates: not valid Unicode",
           dlg(utterances=[{"history": [], "candidates": ["\udc00"]}])),
          ("history-string", r"utterances\[0\]\.history", dlg(utterances=[{"history": "hi", "candidates": ["x"]}])),
          ("history-numbers", r"utterances\[0\]\.history", dlg(utterances=[{"history": [1], "candidates": ["x"]}])),
      ]],
    Case("json-split-name-with-newline", "d.json", json.dumps({"a\nb": [1]}).encode(),
         error=r"d\.json: no examples found .*'a\\nb'\[0\]: expected an object"),
    Case("json-1mb-line", "d.json", hf(dlg(utterances=[{"history": ["word " * (MB // 5)], "candidates": ["ok"]}])),
         examples=1),
    Case("json-huge-persona", "d.json", hf(dlg(HUGE_PERSONA)), examples=2),
    Case("json-long-response", "d.json", hf(dlg(utterances=[{"history": ["hi"], "candidates": [LONG_RESPONSE]}])),
         examples=1),
    # ---- spc (Synthetic-Persona-Chat CSV) ----
    Case("spc-empty", "d.csv", b"", error=r"d\.csv:1: not a Synthetic-Persona-Chat CSV"),
    Case("spc-header-only", "d.csv", spc(), error=r"d\.csv: no examples found"),
    Case("spc-binary", "d.csv", BINARY, error=r"d\.csv:1: not UTF-8"),
    Case("spc-latin1", "d.csv", (SPC_HEAD + SPC_ROW + '"café.","b.","User 1: hi\nUser 2: oui"\n').encode("latin-1"),
         error=r"d\.csv:6: not UTF-8"),
    Case("spc-utf16", "d.csv", (SPC_HEAD + SPC_ROW).encode("utf-16"), error=r"d\.csv:1: not UTF-8"),
    Case("spc-bom", "d.csv", b"\xef\xbb\xbf" + spc(SPC_ROW), examples=2),
    Case("spc-missing-columns", "d.csv", b"persona,conversation\na.,b\n", error=r"d\.csv:1: not a Synthetic"),
    Case("spc-wrong-column-count", "d.csv", spc('"a.","b."\n', SPC_ROW), examples=2, skipped=1,
         strict_error=r"d\.csv:2: expected 3 columns, found 2"),
    Case("spc-empty-persona", "d.csv", spc('"a.","","User 1: hi\nUser 2: yo"\n', SPC_ROW), examples=2, skipped=1,
         strict_error=r"d\.csv:3: empty persona"),
    Case("spc-one-turn", "d.csv", spc('"a.","b.","User 1: hi"\n', SPC_ROW), examples=2, skipped=1,
         strict_error=r"d\.csv:2: conversation has fewer than two turns"),
    Case("spc-unbalanced-quote", "d.csv", spc('"a.","b.","User 1: hi\nUser 2: "yo" there"\n', SPC_ROW),
         examples=2, skipped=1, strict_error=r"d\.csv:3: invalid CSV row"),
    Case("spc-1mb-field", "d.csv", spc(SPC_ROW, f'"a.","b.","User 1: {"word " * (MB // 5)}\nUser 2: yo"\n', SPC_ROW),
         examples=5, check=lambda exs: len(exs[2].context[0]) > MB - 10),  # over the csv module's 128 KiB limit
    Case("spc-huge-persona", "d.csv", spc('"' + "\n".join(HUGE_PERSONA[:4000]) + '","b.","User 1: hi\nUser 2: yo"\n'),
         examples=1, check=lambda exs: len(exs[0].partner_persona) == 4000),
    Case("spc-long-response", "d.csv", spc(f'"a.","b.","User 1: hi\nUser 2: {LONG_RESPONSE}"\n'), examples=1),
]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc: int, err: str, pattern: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("spt: error: ")
    assert re.search(pattern, err), (pattern, err)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _lines(path: Path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8"))


def test_table_size():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)
    assert {Path(c.name).suffix for c in CASES} == {".jsonl", ".txt", ".json", ".csv"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path, capsys, caplog):
    src = tmp_path / "in" / case.name
    src.parent.mkdir()
    src.write_bytes(case.data)
    fmt = ["--data-format", case.fmt] if case.fmt else []
    out = tmp_path / "out"

    # the reader itself
    report = ReadReport()
    if case.error:
        with pytest.raises(DataError) as exc:
            read_examples(src, case.fmt, report=report)
        assert "\n" not in str(exc.value) and re.search(case.error, str(exc.value))
    else:
        examples = read_examples(src, case.fmt, report=report)
        assert (len(examples), report.skipped) == (case.examples, case.skipped)
        if case.dialogues is not None:
            assert len({e.dialogue_id for e in examples}) == case.dialogues
        if case.check is not None:
            assert case.check(examples)
    if case.strict_error:
        with pytest.raises(DataError, match=case.strict_error):
            read_examples(src, case.fmt, strict=True)

    # spt data stats
    caplog.clear()
    rc, stdout, err = _run(capsys, "data", "stats", str(src), *fmt)
    if case.error:
        _assert_one_line_error(rc, err, case.error)
    else:
        assert rc == 0 and "Traceback" not in err
        stats = json.loads(stdout)
        assert (stats["examples"], stats["skipped"]) == (case.examples, case.skipped)
        if case.dialogues is not None:
            assert stats["dialogues"] == case.dialogues
        warned = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        if case.skipped:
            assert len(warned) == 1 and f"skipped {case.skipped} malformed" in warned[0]
            assert str(src) in warned[0] and re.search(case.strict_error, warned[0])  # names file:line, field
        else:
            assert not warned
    if case.strict_error:
        rc, _, err = _run(capsys, "data", "stats", str(src), *fmt, "--strict")
        _assert_one_line_error(rc, err, case.strict_error)

    # spt data split
    rc, stdout, err = _run(capsys, "data", "split", str(src), *fmt, "--out", str(out / "split"),
                           "--fractions", "train=0.5,valid=0.5")
    if case.error:
        _assert_one_line_error(rc, err, case.error)
        assert _files(out) == []
    else:
        assert rc == 0, err
        assert _files(out / "split") == ["train.jsonl", "valid.jsonl"]
        assert sum(_lines(out / "split" / f) for f in ("train.jsonl", "valid.jsonl")) == case.examples

    # spt data convert
    rc, stdout, err = _run(capsys, "data", "convert", str(src), *fmt, "--out", str(out / "conv" / "all.jsonl"))
    if case.error:
        _assert_one_line_error(rc, err, case.error)
        assert _files(out) == []
    else:
        assert rc == 0, err
        assert _files(out / "conv") == ["all.jsonl"]
        assert stdout == f"wrote {case.examples} examples to {out / 'conv' / 'all.jsonl'}\n"
        back = read_examples(out / "conv" / "all.jsonl")
        assert len(back) == case.examples
        assert back == read_examples(src, case.fmt)  # nothing lost or changed on the way
    assert not list(tmp_path.rglob("*.tmp"))
    assert _files(src.parent) == [case.name]  # the input is untouched and nothing was written next to it


# --- output paths -------------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "in" / "d.jsonl"
    path.parent.mkdir()
    path.write_bytes(jl(*(rec(i) for i in range(10))))
    return path


@pytest.mark.parametrize("fractions, problem", [
    ("../../escape=0.5,train=0.5", r"bad split name '\.\./\.\./escape'"),
    ("train=0.5,../valid=0.5", r"bad split name '\.\./valid'"),
    ("/tmp/abs=1", r"bad split name '/tmp/abs'"),
    ("a/b=1", r"bad split name 'a/b'"),
    (".=0.5,train=0.5", r"bad split name '\.'"),
    ("..=0.5,train=0.5", r"bad split name '\.\.'"),
    (".hidden=1", r"bad split name '\.hidden'"),
    ("tr ain=1", r"bad split name 'tr ain'"),
    ("x" * 101 + "=1", r"bad split name 'x{101}'"),
    ("=1", r"bad split spec '=1'"),
    ("train", r"bad split spec 'train'"),
    ("train=abc", r"bad split spec 'train=abc'"),
    ("train=0.5,train=0.5", r"split 'train' appears twice"),
    ("train=nan,valid=1", r"bad split fraction 'train=nan'"),
    ("train=inf", r"bad split fraction 'train=inf'"),
    ("train=-1,valid=2", r"bad split fraction 'train=-1'"),
    ("train=0,valid=0", r"sum to more than 0"),
])
def test_split_refuses_bad_fractions(good, tmp_path, capsys, fractions, problem):
    before = _files(tmp_path)
    rc, _, err = _run(capsys, "data", "split", str(good), "--out", str(tmp_path / "out" / "x"),
                      "--fractions", fractions)
    _assert_one_line_error(rc, err, problem)
    assert _files(tmp_path) == before  # nothing written anywhere, inside --out or outside it


def test_split_plain_names_with_dots_and_dashes_are_fine(good, tmp_path, capsys):
    rc, _, err = _run(capsys, "data", "split", str(good), "--out", str(tmp_path / "out"),
                      "--fractions", "train.v2=0.5,valid-a_1=0.5")
    assert rc == 0, err
    assert _files(tmp_path / "out") == ["train.v2.jsonl", "valid-a_1.jsonl"]


def test_split_refuses_to_overwrite_its_input(good, capsys):
    rc, _, err = _run(capsys, "data", "split", str(good), "--out", str(good.parent), "--fractions", "d=0.5,e=0.5")
    _assert_one_line_error(rc, err, r"split 'd' would overwrite the input file")
    assert _lines(good) == 10 and _files(good.parent) == ["d.jsonl"]


def test_split_out_is_a_file(good, tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    rc, _, err = _run(capsys, "data", "split", str(good), "--out", str(tmp_path / "file"))
    _assert_one_line_error(rc, err, r"--out .*file is a file")
    assert (tmp_path / "file").read_text() == "keep"


def test_split_leaves_nothing_when_one_split_cannot_be_written(good, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "valid.jsonl").mkdir(parents=True)  # the second split's path is taken by a folder
    rc, _, err = _run(capsys, "data", "split", str(good), "--out", str(out))
    _assert_one_line_error(rc, err, r"valid\.jsonl")
    assert _files(out) == ["valid.jsonl"]  # no train.jsonl, no temp file


def test_split_write_failure_midway_removes_everything(good, tmp_path, capsys, monkeypatch):
    """A failure while writing the second split (here: a full disk) leaves neither split nor temp file."""
    calls = []
    real = Example.to_json

    def failing(self):
        calls.append(1)
        if len(calls) > 8:  # train gets 8 of the 10 dialogues
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(Example, "to_json", failing)
    rc, _, err = _run(capsys, "data", "split", str(good), "--out", str(tmp_path / "out" / "deep"))
    _assert_one_line_error(rc, err, r"No space left on device")
    assert _files(tmp_path / "out") == []  # the folders it created are gone too


def test_convert_out_is_an_existing_folder(good, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    rc, _, err = _run(capsys, "data", "convert", str(good), "--out", str(tmp_path / "dir"))
    _assert_one_line_error(rc, err, r"--out .*dir is a folder")
    assert _files(tmp_path / "dir") == [] and not list(tmp_path.rglob("*.tmp"))


def test_convert_out_is_the_input(good, capsys):
    rc, _, err = _run(capsys, "data", "convert", str(good), "--out", str(good))
    _assert_one_line_error(rc, err, r"would overwrite the input file")
    rc, _, err = _run(capsys, "data", "convert", str(good))  # default: the input name with .jsonl
    _assert_one_line_error(rc, err, r"would overwrite the input file")
    assert _lines(good) == 10


def test_convert_out_under_a_file(good, tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    rc, _, err = _run(capsys, "data", "convert", str(good), "--out", str(tmp_path / "file" / "x.jsonl"))
    _assert_one_line_error(rc, err, r"cannot write .*file")
    assert (tmp_path / "file").read_text() == "keep" and not list(tmp_path.rglob("*.tmp"))


def test_convert_keeps_the_old_output_when_writing_fails(good, tmp_path, capsys, monkeypatch):
    target = tmp_path / "all.jsonl"
    target.write_text("old\n")

    def failing(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Example, "to_json", failing)
    rc, _, err = _run(capsys, "data", "convert", str(good), "--out", str(target))
    _assert_one_line_error(rc, err, r"No space left on device")
    assert target.read_text() == "old\n" and _files(tmp_path) == ["all.jsonl", "in", "in/d.jsonl"]


def test_input_is_a_folder_or_missing(tmp_path, capsys):
    rc, _, err = _run(capsys, "data", "stats", str(tmp_path))
    _assert_one_line_error(rc, err, rf"{re.escape(str(tmp_path))}: not a regular file")
    rc, _, err = _run(capsys, "data", "convert", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.jsonl"))
    _assert_one_line_error(rc, err, r"missing\.txt: no such file")
    assert _files(tmp_path) == []


def test_synth_refuses_bad_split_names_before_writing(tmp_path, capsys):
    rc, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "s"), "--dialogues", "5",
                      "--split", "../x=0.5,train=0.5")
    _assert_one_line_error(rc, err, r"bad split name '\.\./x'")
    rc, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "s"), "--dialogues", "5",
                      "--split", "synthetic=0.5,train=0.5")
    _assert_one_line_error(rc, err, r"'synthetic' is taken")
    assert _files(tmp_path) == []


def test_write_jsonl_failure_leaves_no_temp_and_no_partial_file(tmp_path):
    good_ex = Example(("a.",), ("hi",), "ok")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be written as UTF-8
        write_jsonl([good_ex, Example(("a.",), (), "\ud800")], tmp_path / "sub" / "x.jsonl")
    assert _files(tmp_path) == []
    with pytest.raises(IsADirectoryError):
        write_jsonl_files({tmp_path / "a.jsonl": [good_ex], tmp_path: [good_ex]})
    assert _files(tmp_path) == []
    assert write_jsonl_files({tmp_path / "a.jsonl": [good_ex], tmp_path / "b.jsonl": []}) == \
        {tmp_path / "a.jsonl": 1, tmp_path / "b.jsonl": 0}
    assert _files(tmp_path) == ["a.jsonl", "b.jsonl"]


# --- real processes: no traceback reaches the user --------------------------------------------------

PROCESS_CASES = ["jsonl-turn-word", "jsonl-turn-null", "jsonl-dialogue-id-null", "jsonl-deep-nesting", "parlai-bom",
                 "json-utf16", "spc-1mb-field", "spc-bom", "jsonl-all-lines-bad"]


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_hostile_input_in_a_real_process(case_id, tmp_path):
    """Rejected cases: ``convert`` (with --strict where the case has skips) fails with one stderr line.
    Accepted cases: ``stats`` counts the examples, dialogues and skips."""
    case = next(c for c in CASES if c.id == case_id)
    src = tmp_path / case.name
    src.write_bytes(case.data)
    expected = case.error or case.strict_error
    if expected:
        args = ["convert", str(src), "--out", str(tmp_path / "o" / "a.jsonl"), *(["--strict"] * bool(case.skipped))]
    else:
        args = ["stats", str(src)]
    proc = subprocess.run([sys.executable, "-m", "spt.cli", "data", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert "Traceback" not in proc.stderr
    if expected:
        assert proc.returncode == 2
        assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
        assert re.search(expected, proc.stderr)
        assert _files(tmp_path / "o") == []
    else:
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)
        assert (stats["examples"], stats["skipped"]) == (case.examples, case.skipped)
        assert case.dialogues is None or stats["dialogues"] == case.dialogues
    assert not list(tmp_path.rglob("*.tmp"))


def test_convert_to_existing_folder_in_a_real_process(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(jl(rec(0)))
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-m", "spt.cli", "data", "convert", str(src), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "is a folder" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]
