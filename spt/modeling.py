"""Loading the frozen base LM and its tokenizer (hub name or local folder), and building one from scratch."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str):
    """AutoTokenizer with a pad token (pad = eos when the tokenizer has none, e.g. GPT-2, Llama)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load a tokenizer from {name_or_path!r} (a hub name, or a folder with "
            f"tokenizer files): {e}"
        ) from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_lm(name_or_path: str, dtype: str = "float32"):
    """AutoModelForCausalLM in eval mode (dropout off: CPU attention is ~5x slower with dropout)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load a causal LM from {name_or_path!r} (a hub name, or a folder with config.json "
            f"and weights): {e}"
        ) from None
    return model.eval()


def train_tokenizer(texts, vocab_size: int = 2048, eos_token: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer trained on ``texts`` (for models built from scratch, offline).

    One special token serves as bos = eos = pad, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos_token, eos_token=eos_token, pad_token=eos_token, unk_token=eos_token,
    )


def build_scratch_lm(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int,
                     eos_token_id: int = 0, seed: int = 0):
    """A randomly initialised GPT-2 style causal LM (no download): the offline demo's base LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_positions=n_positions, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                        pad_token_id=eos_token_id, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)
