"""Batched generation where every row carries its own selected soft prompt: ONE ``generate`` call per batch.

Rows are left-padded and spliced as (pad, prompt, text), so position ids (from the attention mask)
and the KV cache are right for every row, whatever prompt it selected.

Two things make a batched call cheap (``bench/serve_load.py`` measures them): a KV cache that appends in
place (:class:`GrowingCache`) instead of re-concatenating the whole cache at every token, and, with
``generate.prefill_precision: bf16``, the input (prefill) forward under bf16 autocast, where a large batch
spends most of its time, while decoding stays in the LM's precision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .batching import Item, collate
from .config import GenerateConfig
from .data import Example
from .format import DialogueFormatter, ResponseTooLong
from .losses import per_example_sum
from .model import mask_positions, response_token_example, splice

log = logging.getLogger(__name__)


@dataclass
class Generation:
    prediction: str
    raw: str  # the decoded continuation before post-processing
    prompt: int | None = None  # selected prompt index (SPT); None for methods without a bank
    scores: list[float | None] = field(default_factory=list)  # the K retriever scores (None: not finite)
    ref_nll: float | None = None  # summed NLL of the reference response (+ EOS) under the selected prompt
    ref_tokens: int = 0
    ref_nll_by_prompt: list[float] | None = None  # the same under each of the K prompts (SPT)


def postprocess(text: str, stops: Sequence[str]) -> str:
    """Cut at the first stop string (the paper: "Q:", "R:", newline, ":") and tidy whitespace."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return " ".join(text[:cut].split())


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


# --- the KV cache and the prefill ------------------------------------------------------------------

class GrowingLayer(DynamicLayer):
    """One layer's KV cache appended in place into a buffer with spare room: amortised O(1) per new token,
    where transformers' ``DynamicLayer`` concatenates the whole cache at every token (O(length) copying:
    40% of a 32-row generate call on a 2-core CPU). Keys and values are kept in ``dtype`` (the LM's), so a
    prefill run under bf16 autocast leaves a cache that decoding reads in the LM's precision. Anything else
    that rewrites the cache (beam search's reordering, cropping) replaces ``keys``/``values``; the next
    update copies them into a fresh buffer, so every operation of the parent class stays correct."""

    def __init__(self, dtype: torch.dtype | None = None, reserve: int = 0):
        super().__init__()
        self.dtype, self.reserve = dtype, reserve  # reserve: room the first buffer leaves for new tokens
        self._k = self._v = self._view = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        dtype = self.dtype or key_states.dtype
        n = self.get_seq_length()
        m = n + key_states.shape[-2]
        if (self._k is None or self.keys is not self._view or m > self._k.shape[-2]
                or self._k.shape[:-2] != key_states.shape[:-2]):
            capacity = m + (self.reserve if n == 0 and self.reserve > 0 else max(64, m // 2))
            k = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1], dtype=dtype)
            v = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1], dtype=dtype)
            if n:
                k[..., :n, :] = self.keys
                v[..., :n, :] = self.values
            self._k, self._v = k, v
        self._k[..., n:m, :] = key_states
        self._v[..., n:m, :] = value_states
        self.keys = self._view = self._k[..., :m, :]
        self.values = self._v[..., :m, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A :class:`GrowingLayer` per layer (created as the model first writes each one)."""

    def __init__(self, dtype: torch.dtype | None = None, reserve: int = 0):
        Cache.__init__(self, layer_class_to_replicate=partial(GrowingLayer, dtype, reserve))


def kv_cache(lm, reserve: int = 0) -> Cache | None:
    """A :class:`GrowingCache` for ``lm`` whose first buffers leave room for ``reserve`` new tokens, or None
    (transformers' own cache) where the model has layers other than full attention (sliding windows, linear
    attention) or is an encoder-decoder."""
    cfg = lm.config.get_text_config(decoder=True) if hasattr(lm.config, "get_text_config") else lm.config
    types = getattr(cfg, "layer_types", None) or []
    if (getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "sliding_window", None)
            or any(t != "full_attention" for t in types)):
        return None
    return GrowingCache(getattr(lm, "dtype", None), reserve)


def lm_generate(lm, cfg: GenerateConfig, kw: dict, attention_mask: torch.Tensor, *,
                input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """``lm.generate`` on left-padded rows with :func:`kv_cache`'s cache. With ``cfg.prefill_precision ==
    "bf16"`` (greedy or sampling; beam search expands rows inside generate, so it prefills there), every input
    position but the last first runs under bf16 autocast into the cache; generate then runs the last position
    and every new token in the LM's precision."""
    cache = kv_cache(lm, cfg.max_new_tokens + 1)  # + 1: a bf16 prefill leaves the last input position to generate
    if cache is not None:
        kw = {**kw, "cache": cache}
        if cfg.prefill_precision == "bf16" and cfg.num_beams == 1 and attention_mask.shape[1] > 1:
            x = {"inputs_embeds": inputs_embeds[:, :-1]} if inputs_embeds is not None else \
                {"input_ids": input_ids[:, :-1]}
            mask = attention_mask[:, :-1]
            with torch.autocast(attention_mask.device.type, dtype=torch.bfloat16):
                lm(**x, attention_mask=mask, position_ids=mask_positions(mask), cache=cache, use_cache=True,
                   logits_to_keep=1)
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    return lm.generate(**inputs, attention_mask=attention_mask, **kw)


def generation_kwargs(cfg: GenerateConfig, tokenizer) -> dict:
    kw = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "do_sample": cfg.do_sample,
          "repetition_penalty": cfg.repetition_penalty, "pad_token_id": tokenizer.pad_token_id,
          "eos_token_id": tokenizer.eos_token_id}
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    if cfg.no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = cfg.no_repeat_ngram_size
    return kw


def _decode(tokenizer, out: torch.Tensor, cfg: GenerateConfig) -> list[tuple[str, str]]:
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [(postprocess(t, cfg.stop), t) for t in texts]


def _encode_prompts(formatter: DialogueFormatter, examples: Sequence[Example], reserve: int) -> list[list[int]]:
    """Inference inputs with room for ``reserve`` new tokens within max_length (a clear error if none is left)."""
    try:
        return [formatter.encode_prompt(ex.persona, ex.context, reserve=reserve) for ex in examples]
    except ResponseTooLong:
        raise ValueError(f"generate.max_new_tokens={reserve} leaves no room for the input within "
                         f"data.max_length={formatter.max_length}; lower generate.max_new_tokens") from None


@torch.no_grad()
def reference_nll(logits_fn, formatter: DialogueFormatter, examples: Sequence[Example], device, copies: int = 1):
    """Summed NLL and token count of each reference response (+ EOS); None and 0 where it is not scored.

    ``logits_fn(input_ids, attention_mask, labels) -> (logits (N, V), targets (N,))`` at the response
    positions of ``copies`` stacked copies of the batch (one per prompt for SPT). Returns sums
    (copies, B) as nested lists and counts (B,).

    A reference is encoded exactly as training encodes it (``DialogueFormatter.encode``: the context is
    cut to fit, never the response). One whose response alone does not fit data.max_length is not scored
    (None, 0), as training skips it; the other rows of its batch are scored as if it were not there. It is
    not truncated: the NLL of a cut reference would make PPL look better than it is. A non-finite NLL
    (e.g. an fp16 overflow) is not scored either. The callers count both and warn."""
    items, where = [], []
    for i, ex in enumerate(examples):
        try:
            items.append(Item(formatter.encode(ex), 0, i))
            where.append(i)
        except ResponseTooLong:
            continue
    sums_out: list[list[float | None]] = [[None] * len(examples) for _ in range(copies)]
    counts_out = [0] * len(examples)
    if not items:
        return sums_out, counts_out
    batch = collate(items, formatter.tokenizer.pad_token_id)
    labels = batch["labels"].to(device)
    logits, targets = logits_fn(batch["input_ids"].to(device), batch["attention_mask"].to(device), labels)
    nll = F.cross_entropy(logits.float(), targets, reduction="none").view(copies, -1)  # (copies, M)
    rows, counts = response_token_example(labels)
    sums = per_example_sum(nll, rows, len(items))  # (copies, B')
    for j, i in enumerate(where):
        row = [float(sums[c, j]) for c in range(copies)]
        if all(math.isfinite(v) for v in row):
            counts_out[i] = int(counts[j])
            for c in range(copies):
                sums_out[c][i] = row[c]
    return sums_out, counts_out


def _warn_unscored(unscored: int, total: int, formatter: DialogueFormatter) -> None:
    if unscored:
        log.warning("%d of %d reference(s) not scored (ref_nll null): the response does not fit "
                    "data.max_length=%d (training skips such examples too) or its NLL is not finite; "
                    "spt eval leaves them out of PPL and counts them", unscored, total, formatter.max_length)


@torch.no_grad()
def generate_spt(model, tokenizer, formatter: DialogueFormatter, examples: Sequence[Example],
                 cfg: GenerateConfig, selection_noise: float = 0.0, score_references: bool = True,
                 progress: bool = False) -> list[Generation]:
    """Select a prompt per example (argmax of the retriever's scores) and generate for the whole batch at once.

    With ``score_references``, each reference's NLL is computed under every prompt (``ref_nll_by_prompt``)
    and under the selected one (``ref_nll``); see :func:`reference_nll` for references that are not scored."""
    device = model.prompts.device
    lm = model.lm
    kw = generation_kwargs(cfg, tokenizer)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # sampling
    outputs: list[Generation] = []
    unscored = 0
    for start in tqdm(range(0, len(examples), cfg.batch_size), desc="generate", disable=not progress):
        chunk = examples[start:start + cfg.batch_size]
        ids, mask = left_pad(_encode_prompts(formatter, chunk, cfg.max_new_tokens), tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        E = model.embed(ids)
        S = model.scores(*model.query(ids, mask, E))  # (K, B): the query is the whole inference input
        k = model.select(S, selection_noise, g)  # (B,)
        sp = splice(model.prompts[k], E, mask)
        out = lm_generate(lm, cfg, kw, sp.attention_mask, inputs_embeds=sp.inputs_embeds)
        K = model.K
        sums, counts = reference_nll(partial(_under_every_prompt, model), formatter, chunk, device, copies=K) \
            if score_references else (None, None)
        for i, (pred, raw) in enumerate(_decode(tokenizer, out, cfg)):
            g = Generation(pred, raw, int(k[i]), [_finite(round(float(x), 5)) for x in S[:, i]])
            if sums is not None and sums[0][i] is not None:
                g.ref_nll_by_prompt = [sums[c][i] for c in range(K)]
                g.ref_nll, g.ref_tokens = g.ref_nll_by_prompt[g.prompt], counts[i]
            elif sums is not None:
                unscored += 1
            outputs.append(g)
    _warn_unscored(unscored, len(examples), formatter)
    return outputs


def _finite(x: float) -> float | None:
    """A retriever score for the predictions file: None where it is not finite (NaN is not JSON)."""
    return x if math.isfinite(x) else None


def _under_every_prompt(model, input_ids, attention_mask, labels):
    """Response logits of the batch under each of the K prompts (rows k * B + b)."""
    every = torch.arange(model.K, device=input_ids.device).repeat_interleave(input_ids.shape[0])
    return model.pair_logits(every, input_ids, attention_mask, labels)


@torch.no_grad()
def generate_text(model, tokenizer, formatter: DialogueFormatter, examples: Sequence[Example],
                  cfg: GenerateConfig, score_references: bool = True, progress: bool = False) -> list[Generation]:
    """Plain text generation for methods without a prompt bank (textual, finetune, lora), batched.

    References are scored as in :func:`generate_spt` (see :func:`reference_nll`)."""
    lm = model.lm
    device = next(lm.parameters()).device
    kw = generation_kwargs(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    outputs: list[Generation] = []
    unscored = 0
    for start in tqdm(range(0, len(examples), cfg.batch_size), desc="generate", disable=not progress):
        chunk = examples[start:start + cfg.batch_size]
        ids, mask = left_pad(_encode_prompts(formatter, chunk, cfg.max_new_tokens), tokenizer.pad_token_id)
        out = lm_generate(lm, cfg, kw, mask.to(device), input_ids=ids.to(device))[:, ids.shape[1]:]
        refs = reference_nll(model.response_logits, formatter, chunk, device) if score_references else None
        for i, (pred, raw) in enumerate(_decode(tokenizer, out, cfg)):
            outputs.append(Generation(pred, raw, None, [], refs[0][0][i] if refs else None, refs[1][i] if refs else 0))
            unscored += refs is not None and refs[0][0][i] is None
    _warn_unscored(unscored, len(examples), formatter)
    return outputs
