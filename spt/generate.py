"""Batched generation where every row carries its own selected soft prompt: ONE ``generate`` call per batch.

Rows are left-padded and spliced as (pad, prompt, text), so position ids (from the attention mask)
and the KV cache are right for every row, whatever prompt it selected.
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

from .batching import Item, collate
from .config import GenerateConfig
from .data import Example
from .format import DialogueFormatter, ResponseTooLong
from .losses import per_example_sum
from .model import response_token_example, splice

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
        out = lm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, **kw)
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
        out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)[:, ids.shape[1]:]
        refs = reference_nll(model.response_logits, formatter, chunk, device) if score_references else None
        for i, (pred, raw) in enumerate(_decode(tokenizer, out, cfg)):
            outputs.append(Generation(pred, raw, None, [], refs[0][0][i] if refs else None, refs[1][i] if refs else 0))
            unscored += refs is not None and refs[0][0][i] is None
    _warn_unscored(unscored, len(examples), formatter)
    return outputs
