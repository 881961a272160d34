"""A terminal chat with a trained run (``spt chat RUN``): the loop reads lines from a stream and writes to one,
so it runs the same in a terminal, with piped stdin, and in tests.

The history is kept whole (``/save`` writes all of it); every reply is generated from it exactly as training
formats and truncates an example (``data.max_context_turns``, then ``data.max_length`` minus the new tokens),
because :meth:`spt.api.Responder.respond` encodes it with the run's own formatter.
"""

from __future__ import annotations

import logging
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .api import Reply, Responder
from .data import Example, write_jsonl

log = logging.getLogger(__name__)

HELP = """commands:
  /persona                      show the persona
  /persona A. | B. | ...        set a new persona (sentences separated by |); resets the history
  /reset                        forget the history (same persona)
  /retry                        a new reply to the last message (sampled), replacing the last reply
  /save FILE                    write the dialogue as spt JSONL (one example per reply)
  /help                         this list
  /exit                         leave (Ctrl-D and Ctrl-C too)"""


def split_persona(text: str) -> list[str]:
    """``"i am a pilot. | i have a cat."`` -> ["i am a pilot.", "i have a cat."] (blank parts dropped)."""
    return [p.strip() for p in text.split("|") if p.strip()]


def read_persona_file(path: str | Path) -> list[str]:
    """One persona sentence per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    persona = [line.strip() for line in lines if line.strip()]
    if not persona:
        raise ValueError(f"{path}: no persona sentences (one per line)")
    return persona


def random_persona(data: str | Path, seed: int = 0, data_format: str | None = None) -> list[str]:
    """The persona of a random example of a data file (any format spt reads)."""
    from .data import read_examples

    examples = read_examples(data, data_format)
    if not examples:
        raise ValueError(f"{data}: no examples to take a persona from")
    return list(random.Random(seed).choice(examples).persona)


def format_selection(reply: Reply) -> str:
    """``[prompt 2 | 0.01 0.03 0.91 0.05]`` for a prompt bank; "" for methods without one."""
    if reply.prompt is None:
        return ""
    scores = " ".join("nan" if s is None else f"{s:.2f}" for s in reply.scores)
    return f"[prompt {reply.prompt} | {scores}]"


@dataclass
class Turn:
    user: str
    bot: Reply | None = None


@dataclass
class ChatSession:
    """The dialogue state: persona, turns, and how replies are generated."""

    responder: Responder
    persona: list[str]
    options: dict = field(default_factory=dict)  # generate.* fields (without the prefix)
    turns: list[Turn] = field(default_factory=list)
    dialogue_id: str = field(default_factory=lambda: f"chat-{uuid.uuid4().hex[:8]}")
    calls: int = 0  # generate calls so far: each one gets its own sampling seed

    def history(self, upto: int | None = None) -> list[str]:
        """Partner and bot turns, oldest first, ending with the user's message of turn ``upto`` (default: last)."""
        turns = self.turns if upto is None else self.turns[:upto + 1]
        out: list[str] = []
        for t in turns:
            out.append(t.user)
            if t.bot is not None and t is not turns[-1]:
                out.append(t.bot.text)
        return out

    def reply(self, message: str) -> Reply:
        self.turns.append(Turn(message))
        try:
            self.turns[-1].bot = self._generate(self.options)
        except BaseException:
            self.turns.pop()  # a failed or interrupted turn leaves no half-turn behind
            raise
        return self.turns[-1].bot

    def retry(self) -> Reply:
        """A new reply to the last message: sampled (with a new seed), whatever the decoding settings."""
        if not self.turns:
            raise ValueError("nothing to retry yet")
        self.turns[-1].bot = self._generate({**self.options, "do_sample": True})
        return self.turns[-1].bot

    def _generate(self, options: dict) -> Reply:
        seed = options.get("seed", self.responder.config.generate.seed) + self.calls
        self.calls += 1
        return self.responder.respond(self.persona, self.history(), **{**options, "seed": seed})

    def reset(self, persona: Sequence[str] | None = None) -> None:
        if persona is not None:
            self.persona = list(persona)
        self.turns = []
        self.dialogue_id = f"chat-{uuid.uuid4().hex[:8]}"

    def examples(self) -> list[Example]:
        """One example per bot turn (persona, the history up to the user's message, the reply). Empty replies
        are left out: spt's JSONL needs a non-empty response."""
        out = []
        for i, t in enumerate(self.turns):
            if t.bot is not None and t.bot.text.strip():
                out.append(Example(tuple(self.persona), tuple(self.history(i)), t.bot.text, self.dialogue_id, turn=i))
        return out


class Chat:
    """The read-eval-print loop over ``inp`` and ``out``. ``interactive``: a person at a terminal (prompts
    and colour); otherwise (piped stdin) plain lines only, for scripting."""

    def __init__(self, session: ChatSession, inp: TextIO, out: TextIO, interactive: bool = False,
                 color: bool | None = None):
        self.session, self.inp, self.out, self.interactive = session, inp, out, interactive
        self.color = interactive if color is None else color

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _read(self) -> str | None:
        if self.interactive and self.inp is sys.stdin:
            try:
                return input(self._style("you> ", "1"))  # readline editing and history
            except EOFError:
                self.say()
                return None
        line = self.inp.readline()
        return None if not line else line.rstrip("\r\n")

    def show_persona(self) -> None:
        self.say(self._style("persona: " + " | ".join(self.session.persona), "2"))

    def show_reply(self, reply: Reply) -> None:
        sel = format_selection(reply)
        text = reply.text if reply.text.strip() else "(empty reply)"
        self.say(f"{self._style('bot:', '1;34')} {text}" + (f"  {self._style(sel, '2')}" if sel else ""))

    def run(self) -> int:
        """Chat until /exit, end of input, or Ctrl-C; returns the exit status (0)."""
        self.show_persona()
        if self.interactive:
            self.say(self._style("type a message, or /help for commands", "2"))
        try:
            while (line := self._read()) is not None:
                if not self.handle(line):
                    break
        except KeyboardInterrupt:
            self.say()
        return 0

    def handle(self, line: str) -> bool:
        """One line of input; False ends the chat."""
        text = line.strip()
        if not text:
            return True
        command, _, arg = text.partition(" ") if text.startswith("/") else ("", "", text)
        if command in ("/exit", "/quit"):
            return False
        try:
            if command:
                self._command(command, arg.strip())
            else:
                self.show_reply(self.session.reply(text))
        except ValueError as e:  # a bad command or setting: say so and keep chatting
            self.say(f"error: {e}")
        return True

    def _command(self, command: str, arg: str) -> None:
        s = self.session
        if command == "/help":
            self.say(HELP)
        elif command == "/persona":
            if arg:
                persona = split_persona(arg)
                if not persona:
                    raise ValueError("give the persona as sentences separated by |")
                s.reset(persona)
                self.say("persona set; history reset")
            self.show_persona()
        elif command == "/reset":
            s.reset()
            self.say("history reset")
        elif command == "/retry":
            self.show_reply(s.retry())
        elif command == "/save":
            if not arg:
                raise ValueError("/save needs a file name: /save FILE")
            examples = s.examples()
            if not examples:
                raise ValueError("nothing to save yet (no non-empty reply)")
            try:
                n = write_jsonl(examples, Path(arg).expanduser())
            except OSError as e:
                raise ValueError(f"cannot write {arg}: {e.strerror or e}") from None
            skipped = sum(1 for t in s.turns if t.bot is not None) - n
            self.say(f"saved {n} example(s) to {arg}" + (f" ({skipped} empty reply(s) left out)" if skipped else ""))
        else:
            raise ValueError(f"unknown command {command}; /help lists the commands")


def chat(responder: Responder, persona: Sequence[str], inp: TextIO, out: TextIO, interactive: bool = False,
         color: bool | None = None, options: dict | None = None) -> ChatSession:
    """Run a chat on the given streams; returns the session (its turns) when the chat ends. ``options``:
    generation options (``generate.*`` field names) on top of the run's config."""
    if not any(p.strip() for p in persona):
        raise ValueError("no persona: give --persona, --persona-file or --random-persona")
    session = ChatSession(responder, [p.strip() for p in persona if p.strip()], dict(options or {}))
    Chat(session, inp, out, interactive, color).run()
    return session
