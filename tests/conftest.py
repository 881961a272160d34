"""Shared fixtures: paths into ../shared (tests skip when absent) and tiny tokenizers built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PERSONACHAT = SHARED / "data" / "personachat"
SPC_CSV = SHARED / "data" / "synthetic-persona-chat" / "Synthetic-Persona-Chat_valid.csv"
GPT2_TOKENIZER = SHARED / "data" / "gpt2-tokenizer"
MINI_MODEL = SHARED / "models" / "persona-gpt-mini"


def shared_path(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from spt.modeling import load_tokenizer

    return load_tokenizer(str(shared_path(GPT2_TOKENIZER)))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 384-token byte-level BPE trained on synthetic dialogues (bos = eos = pad, like GPT-2)."""
    from spt.data.synth import synth_examples
    from spt.format import render_text
    from spt.modeling import train_tokenizer

    texts = [render_text(e.persona, e.context, e.response) for e in synth_examples(40, seed=7)]
    return train_tokenizer(texts, vocab_size=384)


def make_tiny_lm(kind: str, vocab_size: int, eos_id: int = 0, width: int = 32):
    """A 2-layer causal LM of the given family built from a config (no download), fp32, eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=width, n_head=4, n_positions=512,
                         bos_token_id=eos_id, eos_token_id=eos_id)
        return GPT2LMHeadModel(cfg).eval()
    if kind == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=width, num_attention_heads=4,
                        ffn_dim=2 * width, max_position_embeddings=512, word_embed_proj_dim=width,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        return OPTForCausalLM(cfg).eval()
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=width, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=512,
                          bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny GPT-2 and its tokenizer saved as a HF folder, loaded back through from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-lm")
    tiny_tokenizer.save_pretrained(path)
    make_tiny_lm("gpt2", len(tiny_tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """Synthetic train/valid JSONL files (48/12 dialogues)."""
    from spt.data import split_by_dialogue, write_jsonl
    from spt.data.synth import synth_examples

    path = tmp_path_factory.mktemp("synth")
    parts = split_by_dialogue(synth_examples(60, seed=11), {"train": 0.8, "valid": 0.2}, seed=0)
    for name, part in parts.items():
        write_jsonl(part, path / f"{name}.jsonl")
    return path


TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def tiny_train_args(tiny_lm_dir, synth_dir, out, *extra) -> list[str]:
    """`spt train` arguments for a seconds-long run of the tiny LM on the synthetic data."""
    return ["train", "--config", TINY_CONFIG, "--output-dir", str(out), "--no-progress",
            f"--model.name_or_path={tiny_lm_dir}", f"--data.train={synth_dir / 'train.jsonl'}",
            f"--data.valid={synth_dir / 'valid.jsonl'}", *extra]
