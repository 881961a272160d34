"""The one example type every reader produces, and the error every reader raises."""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message names the file, the line (when known) and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        # Always one line, even for file names or quoted data with line breaks in them.
        super().__init__(f"{where}: {problem}".replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class Example:
    """One response turn of a persona dialogue.

    ``context`` holds the dialogue history, oldest first, ending with the partner's last turn;
    turns alternate, so the speaker of turn i is the partner when ``len(context) - i`` is odd.
    ``response`` is the persona holder's reply to it.
    """

    persona: tuple[str, ...]
    context: tuple[str, ...]
    response: str
    dialogue_id: str = ""
    turn: int = 0
    source: str = ""
    partner_persona: tuple[str, ...] = ()
    style: str | None = None  # latent speaking style (synthetic data only)

    def to_json(self) -> dict:
        d = asdict(self)
        d["persona"], d["context"] = list(self.persona), list(self.context)
        d["partner_persona"] = list(self.partner_persona)
        if not d["partner_persona"]:
            del d["partner_persona"]
        if d["style"] is None:
            del d["style"]
        return d


@dataclass
class ReadReport:
    """What a reader skipped (never silently): counts and the first few reasons."""

    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, err: DataError) -> None:
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons.append(str(err))


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write examples in spt's JSONL format (one example per line); returns the count.

    Atomic: written to ``PATH.tmp`` and renamed; on any failure neither the temp file nor a partial
    ``PATH`` is left (an existing ``PATH`` is kept as it was)."""
    path = Path(path)
    return write_jsonl_files({path: examples})[path]


def write_jsonl_files(files: Mapping[Path, Iterable[Example]]) -> dict[Path, int]:
    """Write several JSONL files all or nothing; returns each file's example count.

    Every file is first written to ``PATH.tmp``; only when all are complete are they renamed into
    place. On any failure the temp files, any file this call created and any folder it created are
    removed, and the exception is re-raised (an ``OSError`` names the file)."""
    paths = {Path(p): examples for p, examples in files.items()}
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file path", str(path))
    new_dirs: list[Path] = []
    tmps: dict[Path, Path] = {}
    created: list[Path] = []
    counts: dict[Path, int] = {}
    try:
        for path, examples in paths.items():
            for parent in reversed(path.parents):
                if not parent.exists():
                    parent.mkdir()
                    new_dirs.append(parent)
            tmp = path.with_name(path.name + ".tmp")
            n = 0
            with tmp.open("w", encoding="utf-8") as f:
                tmps[path] = tmp  # ours to remove from here on
                for ex in examples:
                    f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
                    n += 1
            counts[path] = n
        for path, tmp in tmps.items():
            existed = path.exists()
            tmp.replace(path)
            if not existed:
                created.append(path)
    except BaseException:
        for leftover in [*tmps.values(), *created]:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        for folder in reversed(new_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return counts


def group_by_dialogue(examples: Iterable[Example]) -> Iterator[list[Example]]:
    """Consecutive examples with the same dialogue id, in order."""
    group: list[Example] = []
    for ex in examples:
        if group and ex.dialogue_id != group[-1].dialogue_id:
            yield group
            group = []
        group.append(ex)
    if group:
        yield group
