"""The paper's "causal" input template, tokenised in exactly one place.

    <bos>given persona: {persona joined by " "}; context: Q: {turn} R: {turn} ... R: {response}<eos>

Context turns are prefixed ``Q:`` (partner) and ``R:`` (responder), assigned backwards from the last
turn, which is always the partner's. Only ``{response}<eos>`` carries labels; everything up to and
including the final ``R:`` is the inference input. Truncation to ``max_length`` never cuts the
response: it drops the oldest context turns first, then persona tokens from the left.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from .data import Example

IGNORE_INDEX = -100


class ResponseTooLong(ValueError):
    """The response alone (with the minimal input around it) does not fit in ``max_length``."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example. ``input_ids[:prompt_len]`` is the inference input (ends at ``R:``)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on response + EOS
    prompt_len: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_len]


def render_segments(persona: tuple[str, ...] | list[str], context: tuple[str, ...] | list[str],
                    instruction: str = "") -> list[str]:
    """The template as text pieces: [header, turn_1, ..., turn_m, " R:"]; their concatenation is the input.

    ``instruction`` (textual prompting) goes before the persona, inside the header."""
    header = "given persona: " + " ".join(p.strip() for p in persona) + "; context:"
    if instruction.strip():
        header = f"{instruction.strip()} {header}"
    m = len(context)
    turns = [f" {'Q' if (m - i) % 2 == 1 else 'R'}: {t.strip()}" for i, t in enumerate(context)]
    return [header, *turns, " R:"]


def render_text(persona, context, response: str | None = None) -> str:
    """Human-readable template text (no special tokens), e.g. for reports or textual prompting."""
    text = "".join(render_segments(persona, context))
    return text if response is None else f"{text} {response.strip()}"


class DialogueFormatter:
    """Turns examples into token ids, labels and inference inputs for one tokenizer.

    Uses the tokenizer's offset mapping, so a turn's tokens are those of the whole string (no
    per-piece tokenisation artefacts such as SentencePiece's extra leading "▁").
    """

    def __init__(self, tokenizer, max_length: int = 512, max_context_turns: int | None = None,
                 instruction: str = ""):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; spt needs one to end responses")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer (offsets are needed)")
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {max_length}")
        if max_context_turns is not None and max_context_turns < 0:
            raise ValueError(f"max_context_turns must be >= 0 or None, got {max_context_turns}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_context_turns = max_context_turns
        self.instruction = instruction
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def encode(self, example: Example) -> Encoded:
        """Training input: prompt + response + EOS, labels on response + EOS only."""
        return self._encode(example.persona, example.context, example.response)

    def encode_prompt(self, persona, context, reserve: int = 0) -> list[int]:
        """Inference input, ending at the final ``R:``, truncated to ``max_length - reserve`` tokens
        (reserve room for generation). Equals ``encode(example).prompt_ids`` when nothing is cut."""
        return self._encode(persona, context, None, self.max_length - reserve).input_ids

    def _encode(self, persona, context, response: str | None, max_length: int | None = None) -> Encoded:
        max_length = self.max_length if max_length is None else max_length  # 0 (all reserved) is not "unset"
        context = list(context)
        if self.max_context_turns is not None:
            context = context[len(context) - self.max_context_turns:] if self.max_context_turns else []
        segments = render_segments(persona, context, self.instruction)
        if response is not None:
            segments.append(" " + response.strip())
        pieces = self._tokenize_segments(segments)
        header, turns, tail = pieces[0], pieces[1:len(context) + 1], pieces[len(context) + 1]
        target = pieces[-1] + [self.eos] if response is not None else []
        fixed = len(self.bos) + len(tail) + len(target)
        if fixed > max_length:
            if response is None:
                raise ResponseTooLong(f"the prompt's fixed part ({fixed} tokens) does not fit in {max_length} tokens "
                                      f"(max_length={self.max_length} minus the tokens reserved for generation)")
            raise ResponseTooLong(f"response of {len(target)} tokens does not fit in max_length={max_length}")
        budget = max_length - fixed
        # Priority: the newest turn, then the persona, then older turns newest-first; what does not
        # fit is cut from the left (oldest turns whole, persona or a lone huge turn token-wise).
        newest = turns[-1][-budget:] if turns and budget else []
        budget -= len(newest)
        header = header[max(0, len(header) - budget):]
        budget -= len(header)
        kept = [newest] if turns else []
        for turn in reversed(turns[:-1]):
            if len(turn) > budget:
                break
            kept.insert(0, turn)
            budget -= len(turn)
        prompt = self.bos + header + [t for turn in kept for t in turn] + tail
        return Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target, len(prompt))

    def _tokenize_segments(self, segments: list[str]) -> list[list[int]]:
        """Tokenise the concatenation once and cut the ids at the segments' character boundaries."""
        text = "".join(segments)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [s for s, _ in enc["offset_mapping"]]
        cuts, pos = [0], 0
        for seg in segments[:-1]:
            pos += len(seg)
            cuts.append(bisect.bisect_left(starts, pos))  # first token starting at/after the boundary
        cuts.append(len(ids))
        return [ids[a:b] for a, b in itertools.pairwise(cuts)]
