"""The Python API (the CLI uses it too): load a checkpoint of any method in one call, then chat or generate.

    import spt
    bot = spt.load("runs/my-run")
    reply = bot.respond(["i have two dogs.", "i love hiking."], ["hi ! do you have pets ?"])
    print(reply.text, reply.prompt, reply.scores)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, GenerateConfig
from .data import Example
from .generate import Generation


@dataclass
class Reply:
    text: str
    prompt: int | None  # the selected soft prompt (SPT); None for methods without a prompt bank
    scores: list[float]  # the retriever's K scores
    raw: str = ""  # the decoded continuation before post-processing (cut at the stop strings)


class Responder:
    """A trained model ready to answer; wraps the method that trained it."""

    def __init__(self, method):
        self.method = method

    @property
    def config(self) -> Config:
        return self.method.cfg

    def _gen_config(self, overrides: dict) -> GenerateConfig:
        try:
            return dataclasses.replace(self.config.generate, **overrides)
        except TypeError as e:
            raise ValueError(f"unknown generation option: {e}") from None

    def generate(self, examples: Sequence[Example], progress: bool = False, **options) -> list[Generation]:
        """Replies for many examples, batched (options: any ``generate.*`` config field)."""
        return self.method.generate(list(examples), self._gen_config(options), progress=progress)

    def respond(self, persona: Sequence[str], history: Sequence[str], **options) -> Reply:
        """One reply to ``history`` (oldest first, the partner's turn last) in the voice of ``persona``."""
        if not persona:
            raise ValueError("persona must have at least one sentence")
        ex = Example(persona=tuple(persona), context=tuple(history), response="")
        g = self.method.generate([ex], self._gen_config({"batch_size": 1, **options}), score_references=False)
        return Reply(g[0].prediction, g[0].prompt, g[0].scores, g[0].raw)

    def respond_many(self, dialogues: Sequence[tuple[Sequence[str], Sequence[str]]],
                     max_input_tokens: int | None = None, **options) -> list[Reply]:
        """Replies to many ``(persona, history)`` pairs in ONE generate call per ``batch_size`` rows (default: all
        of them), each row with its own selected prompt. ``max_input_tokens`` caps the inference input below
        ``data.max_length - max_new_tokens`` (cut by the training rule, see :meth:`input_ids`)."""
        if not dialogues:
            return []
        if any(not persona for persona, _ in dialogues):
            raise ValueError("persona must have at least one sentence")
        examples = [Example(persona=tuple(p), context=tuple(h), response="") for p, h in dialogues]
        gen = self._gen_config({"batch_size": len(examples), **options})
        method = self._limited(max_input_tokens, gen.max_new_tokens)
        return [Reply(g.prediction, g.prompt, g.scores, g.raw)
                for g in method.generate(examples, gen, score_references=False)]

    def input_ids(self, persona: Sequence[str], history: Sequence[str], max_new_tokens: int | None = None,
                  max_input_tokens: int | None = None) -> list[int]:
        """The inference input exactly as generation encodes it: persona and history formatted and truncated as
        in training (``data.max_context_turns``; ``data.max_length`` minus ``max_new_tokens``, and at most
        ``max_input_tokens``). ValueError when not even the input's fixed part fits."""
        from .format import ResponseTooLong

        reserve = self.config.generate.max_new_tokens if max_new_tokens is None else max_new_tokens
        try:
            return self._limited(max_input_tokens, reserve).formatter().encode_prompt(persona, history, reserve)
        except ResponseTooLong:
            raise ValueError(f"max_new_tokens={reserve} leaves no room for the input within "
                             f"data.max_length={self.config.data.max_length}") from None

    def input_length(self, persona: Sequence[str], history: Sequence[str]) -> int:
        """Tokens of the inference input before any cut to fit ``data.max_length`` (after max_context_turns)."""
        from .format import DialogueFormatter

        d = self.config.data
        return len(DialogueFormatter(self.method.tokenizer, 1 << 30, d.max_context_turns, d.instruction)
                   .encode_prompt(persona, history))

    def _limited(self, max_input_tokens: int | None, max_new_tokens: int):
        """The method, or a shallow copy whose data.max_length keeps inputs within ``max_input_tokens``
        (the model and tokenizer are shared; the saved config is not changed)."""
        limit = None if max_input_tokens is None else max_input_tokens + max_new_tokens
        if limit is None or limit >= self.config.data.max_length:
            return self.method
        method = copy.copy(self.method)
        method.cfg = copy.copy(self.method.cfg)
        method.cfg.data = dataclasses.replace(self.method.cfg.data, max_length=limit)
        return method


def load(path: str | Path, device: str | None = None, overrides: dict[str, Any] | None = None) -> Responder:
    """Load a run or checkpoint folder of any method (base model from the config's name or path).

    ``overrides``: dotted config fields to change first, e.g. ``{"model.name_or_path": "NEW_PATH"}``
    when the base model the run was trained on has moved (the CLI's ``--model.name_or_path=NEW_PATH``)."""
    from .methods import load_method

    return Responder(load_method(path, device, overrides))
