"""The Python API (the CLI uses it too): load a checkpoint of any method in one call, then chat or generate.

    import spt
    bot = spt.load("runs/my-run")
    reply = bot.respond(["i have two dogs.", "i love hiking."], ["hi ! do you have pets ?"])
    print(reply.text, reply.prompt, reply.scores)
"""

from __future__ import annotations

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
        return Reply(g[0].prediction, g[0].prompt, g[0].scores)


def load(path: str | Path, device: str | None = None, overrides: dict[str, Any] | None = None) -> Responder:
    """Load a run or checkpoint folder of any method (base model from the config's name or path).

    ``overrides``: dotted config fields to change first, e.g. ``{"model.name_or_path": "NEW_PATH"}``
    when the base model the run was trained on has moved (the CLI's ``--model.name_or_path=NEW_PATH``)."""
    from .methods import load_method

    return Responder(load_method(path, device, overrides))
