"""From examples to padded tensor batches: encoding, length-grouped batches, persona similarity cache."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from .data import Example
from .format import IGNORE_INDEX, DialogueFormatter, Encoded, ResponseTooLong

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    encoded: Encoded
    persona_id: int  # index into EncodedDataset.personas (examples of one persona share it)
    index: int  # position in the source example list


class EncodedDataset(Dataset):
    """Examples encoded once; responses that do not fit ``max_length`` are skipped and counted."""

    def __init__(self, examples: Sequence[Example], formatter: DialogueFormatter):
        self.personas: list[str] = []
        ids: dict[tuple[str, ...], int] = {}
        self.items: list[Item] = []
        self.examples: list[Example] = []
        too_long = 0
        for i, ex in enumerate(examples):
            try:
                enc = formatter.encode(ex)
            except ResponseTooLong:
                too_long += 1
                continue
            if ex.persona not in ids:
                ids[ex.persona] = len(self.personas)
                self.personas.append(" ".join(ex.persona))
            self.items.append(Item(enc, ids[ex.persona], i))
            self.examples.append(ex)
        if too_long:
            log.warning("skipped %d example(s) whose response alone exceeds max_length=%d",
                        too_long, formatter.max_length)
        if not self.items:
            raise ValueError("no example fits in max_length; raise data.max_length")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(it.encoded.input_ids) for it in self.items]


def collate(items: list[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item. query_mask marks the inference input (persona + context)."""
    T = max(len(it.encoded.input_ids) for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    query_mask = torch.zeros(B, T, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it.encoded.input_ids)
        input_ids[b, :n] = torch.tensor(it.encoded.input_ids)
        labels[b, :n] = torch.tensor(it.encoded.labels)
        attention_mask[b, :n] = 1
        query_mask[b, : it.encoded.prompt_len] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "query_mask": query_mask,
            "persona_ids": torch.tensor([it.persona_id for it in items]),
            "index": torch.tensor([it.index for it in items])}


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar lengths: shuffle, sort within windows of 50 batches, shuffle batches.

    Deterministic in (seed, epoch), so a resumed run sees the same order and can skip what it did."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True,
                 group: bool = True, window: int = 50):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.shuffle, self.group, self.window = shuffle, group, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group:
            span = self.batch_size * self.window
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s:s + span], key=self.lengths.__getitem__, reverse=True)]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle and self.group:
            rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class PersonaSimilarity:
    """Sentence BLEU of persona i against persona j (0-100), cached: personas repeat across turns."""

    def __init__(self, personas: list[str]):
        from sacrebleu.metrics import BLEU

        self.personas = personas
        self._bleu = BLEU(effective_order=True)
        self._cache: dict[tuple[int, int], float] = {}

    def pair(self, i: int, j: int) -> float:
        if i == j:
            return 100.0
        key = (i, j)
        if key not in self._cache:
            self._cache[key] = self._bleu.sentence_score(self.personas[i], [self.personas[j]]).score
        return self._cache[key]

    def matrix(self, persona_ids: torch.Tensor) -> torch.Tensor:
        """(B, B) similarities for a batch's persona ids (only i < j is used by the loss)."""
        ids = persona_ids.tolist()
        B = len(ids)
        out = torch.zeros(B, B)
        for a in range(B):
            for b in range(a + 1, B):
                out[a, b] = self.pair(ids[a], ids[b])
        return out
