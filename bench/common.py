"""Shared set-up for the benchmarks: a model (local folder or a shape built from a config) and a batch."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spt.batching import EncodedDataset, collate  # noqa: E402
from spt.data import read_examples  # noqa: E402
from spt.data.synth import synth_examples  # noqa: E402
from spt.format import DialogueFormatter  # noqa: E402
from spt.modeling import load_lm, load_tokenizer  # noqa: E402

MINI = ROOT.parent / "shared" / "models" / "persona-gpt-mini"
PERSONACHAT = ROOT.parent / "shared" / "data" / "personachat" / "valid_self_original_no_cands.txt"


def model_and_tokenizer(spec: str):
    """``mini`` (the shared persona-gpt-mini), ``opt125m`` (OPT-125M shape, random weights, GPT-2 BPE), or a path."""
    if spec == "mini":
        return load_lm(str(MINI)), load_tokenizer(str(MINI))
    if spec == "opt125m":
        from transformers import OPTConfig, OPTForCausalLM

        tok = load_tokenizer(str(ROOT.parent / "shared" / "data" / "gpt2-tokenizer"))
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                        num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        return OPTForCausalLM(cfg).eval(), tok
    return load_lm(spec), load_tokenizer(spec)


def examples(n: int):
    if PERSONACHAT.is_file():
        return read_examples(PERSONACHAT)[:n]
    return synth_examples(n, seed=0)[:n]


def batch(tokenizer, n: int, max_length: int = 512):
    ds = EncodedDataset(examples(n), DialogueFormatter(tokenizer, max_length))
    return collate([ds[i] for i in range(len(ds))], tokenizer.pad_token_id)


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
