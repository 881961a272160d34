"""Memory of the LM forward: train.chunk_size "auto" picks rows per forward from free memory, no chunk ever
changes a result, and no forward builds a KV cache it will not use."""

import logging

import pytest
import torch

from conftest import make_tiny_lm
from spt import model as spt_model
from spt.batching import EncodedDataset, collate
from spt.config import ConfigError, SPTConfig, load_config, parse_overrides
from spt.data.synth import synth_examples
from spt.format import DialogueFormatter
from spt.model import SPTModel, auto_chunk_rows, row_memory

KEYS = ("input_ids", "attention_mask", "labels", "query_mask")


def _inputs(tokenizer, n=6, max_length=120):
    ds = EncodedDataset(synth_examples(4, seed=3)[:n], DialogueFormatter(tokenizer, max_length))
    batch = collate([ds[i] for i in range(len(ds))], tokenizer.pad_token_id)
    return {k: batch[k] for k in KEYS}


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_chunk_gives_the_unchunked_loss_and_gradients(tiny_tokenizer, monkeypatch, caplog):
    inputs = _inputs(tiny_tokenizer)
    K, B = 3, inputs["input_ids"].shape[0]
    results = {}
    for chunk in (None, "auto", 1):
        model = SPTModel(make_tiny_lm("opt", len(tiny_tokenizer)), SPTConfig(K=K, num_virtual_tokens=4), seed=1)
        model.train()
        model.chunk_size = chunk
        results[chunk] = _loss_and_grads(model, inputs)
    # "auto" with almost no free memory: one row per forward, the smallest chunk there is
    monkeypatch.setattr(spt_model, "free_memory_bytes", lambda device: 1)
    calls = []
    original = spt_model.SPTModel._response_logits
    monkeypatch.setattr(spt_model.SPTModel, "_response_logits",
                        lambda self, rows, *a: calls.append(rows.shape[0]) or original(self, rows, *a))
    model = SPTModel(make_tiny_lm("opt", len(tiny_tokenizer)), SPTConfig(K=K, num_virtual_tokens=4), seed=1)
    model.train()
    model.chunk_size = "auto"
    with caplog.at_level(logging.DEBUG, logger="spt.model"):
        results["tiny-memory"] = _loss_and_grads(model, inputs)
    assert calls == [1] * (K * B)
    assert "train.chunk_size auto: 1 of 18 rows per forward" in caplog.text
    loss, grads = results[None]
    assert set(grads) >= {"prompts"}
    for name, (other_loss, other_grads) in results.items():
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-5, msg=f"loss with chunk {name}")
        assert other_grads.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(other_grads[key], grads[key], atol=1e-6, rtol=1e-4,
                                       msg=f"grad of {key} with chunk {name}")


def test_auto_chunk_scales_with_free_memory_and_sequence_length(tiny_tokenizer, monkeypatch):
    lm = make_tiny_lm("opt", len(tiny_tokenizer))
    kept, transient = row_memory(lm, 100, 10, training=True)
    assert kept > 0 and transient > 0
    assert row_memory(lm, 200, 10, training=True)[0] > kept  # longer rows need more
    assert row_memory(lm, 100, 10, training=False)[0] < kept  # no backward: nothing kept but the logits
    cpu = torch.device("cpu")
    for free, want in ((None, 64), (1, 1), (10**15, 64)):
        monkeypatch.setattr(spt_model, "free_memory_bytes", lambda device, free=free: free)
        assert auto_chunk_rows(lm, 64, 100, 10, cpu, training=True) == want
    budget = int((kept * 64 + 10 * transient) / spt_model.AUTO_CHUNK_SAFETY) + 1  # room for exactly 10 rows
    monkeypatch.setattr(spt_model, "free_memory_bytes", lambda device: budget)
    assert auto_chunk_rows(lm, 64, 100, 10, cpu, training=True) == 10
    assert auto_chunk_rows(lm, 64, 400, 10, cpu, training=True) < 10  # decided per batch from its length


def test_free_memory_on_this_machine():
    free = spt_model.free_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0


def test_out_of_memory_in_the_forward_says_to_lower_chunk_size(tiny_tokenizer, monkeypatch):
    model = SPTModel(make_tiny_lm("opt", len(tiny_tokenizer)), SPTConfig(K=2, num_virtual_tokens=4), seed=1)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(spt_model, "response_logits", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"lower train\.chunk_size .*--train\.chunk_size=") as err:
        model(**_inputs(tiny_tokenizer))
    assert "Tried to allocate 2.00 GiB" in str(err.value)


def test_chunk_size_config_values():
    assert load_config(None, parse_overrides(["--train.chunk_size=auto"])).train.chunk_size == "auto"
    assert load_config(None, parse_overrides(["--train.chunk_size=8"])).train.chunk_size == 8
    assert load_config(None, parse_overrides(["--train.chunk_size=null"])).train.chunk_size is None
    with pytest.raises(ConfigError, match=r"train\.chunk_size must be > 0, auto or null"):
        load_config(None, parse_overrides(["--train.chunk_size=0"]))
    with pytest.raises(ConfigError, match=r"train\.chunk_size"):
        load_config(None, parse_overrides(["--train.chunk_size=lots"]))


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_training_and_query_forwards_build_no_kv_cache(kind, tiny_tokenizer):
    """HF bodies build a KV cache by default and copy every layer's keys and values into it; spt's forwards
    (the K*B pairs, the lm_hidden query) never reuse one, so they ask for none."""
    model = SPTModel(make_tiny_lm(kind, len(tiny_tokenizer)), SPTConfig(K=2, num_virtual_tokens=4, query="lm_hidden"),
                     seed=1)
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((kwargs.get("use_cache"), output.get("cache", output.get("past_key_values"))))

    model.lm.base_model.register_forward_hook(hook, with_kwargs=True)
    model(**_inputs(tiny_tokenizer))["loss"].backward()
    assert len(seen) == 2 and all(flag is False and cache is None for flag, cache in seen)
