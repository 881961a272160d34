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
