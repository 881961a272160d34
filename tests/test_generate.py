import pytest
import torch

from conftest import make_tiny_lm
from spt.config import GenerateConfig, SPTConfig
from spt.data.synth import synth_examples
from spt.format import DialogueFormatter
from spt.generate import generate_spt, postprocess
from spt.model import SPTModel


def test_postprocess_cuts_at_first_stop():
    stops = ["Q:", "R:", "\n", ":"]
    assert postprocess(" i like cats . Q: do you ?", stops) == "i like cats ."
    assert postprocess(" yes\nR: more", stops) == "yes"
    assert postprocess(" time: now", stops) == "time"
    assert postprocess("  a   b ", []) == "a b"


def _setup(tiny_tokenizer, K=4):
    torch.manual_seed(3)
    model = SPTModel(make_tiny_lm("gpt2", len(tiny_tokenizer)), SPTConfig(K=K, num_virtual_tokens=3, recipe="paper",
                                                                            prompt_init="random"), seed=5).eval()
    with torch.no_grad():
        model.retriever.normalizer.weight.normal_()  # a random retriever: rows pick different prompts
    return model, DialogueFormatter(tiny_tokenizer, max_length=200)


def test_batched_per_row_prompts_equal_rows_alone(tiny_tokenizer):
    model, fmt = _setup(tiny_tokenizer)
    examples = [e for e in synth_examples(8, seed=4)][:10]
    lengths = {len(fmt.encode_prompt(e.persona, e.context)) for e in examples}
    assert len(lengths) > 3  # rows of different lengths share a left-padded batch
    cfg = GenerateConfig(max_new_tokens=12, batch_size=10, stop=[])
    batched = generate_spt(model, tiny_tokenizer, fmt, examples, cfg, score_references=False)
    assert len({g.prompt for g in batched}) > 1  # several distinct prompts in one generate call
    eos = tiny_tokenizer.eos_token_id
    for ex, g in zip(examples, batched, strict=True):
        ids = torch.tensor([fmt.encode_prompt(ex.persona, ex.context, reserve=12)])
        emb = torch.cat([model.prompts[g.prompt:g.prompt + 1], model.embed(ids)], 1)
        with torch.no_grad():
            alone = model.lm.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                      max_new_tokens=12, do_sample=False, pad_token_id=eos, eos_token_id=eos)[0]
        expected = tiny_tokenizer.decode(alone, skip_special_tokens=True)
        assert g.raw == expected
        assert g.scores and len(g.scores) == 4 and g.prompt == max(range(4), key=lambda k: g.scores[k])


def test_one_generate_call_per_batch(tiny_tokenizer, monkeypatch):
    model, fmt = _setup(tiny_tokenizer)
    calls = []
    real = model.lm.generate
    monkeypatch.setattr(model.lm, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = generate_spt(model, tiny_tokenizer, fmt, synth_examples(4, seed=1)[:12],
                       GenerateConfig(max_new_tokens=4, batch_size=6), score_references=False)
    assert len(out) == 12 and len(calls) == 2


def test_beam_and_sampling_options_run(tiny_tokenizer):
    model, fmt = _setup(tiny_tokenizer)
    ex = synth_examples(2, seed=2)[:3]
    beams = generate_spt(model, tiny_tokenizer, fmt, ex, GenerateConfig(max_new_tokens=6, num_beams=3,
                                                                         no_repeat_ngram_size=2))
    sampled = generate_spt(model, tiny_tokenizer, fmt, ex, GenerateConfig(max_new_tokens=6, do_sample=True,
                                                                           top_p=0.9, top_k=20, temperature=0.7))
    assert len(beams) == len(sampled) == 3
    assert all(g.ref_nll is not None and g.ref_nll > 0 and g.ref_tokens > 1 for g in beams)


def _with_long_reply(n: int = 4):
    from spt.data import Example

    ex = synth_examples(3, seed=6)[:n]
    ex[1] = Example(ex[1].persona, ex[1].context, "and so it goes on " * 60)  # far over max_length=200
    return ex


def test_over_long_reference_is_not_scored_and_does_not_disturb_its_batch(tiny_tokenizer, caplog):
    """SPT: one reference that cannot fit data.max_length in a batch of 4: that row ref_nll None and
    ref_tokens 0 (warned, counted); every other row scored exactly as in a batch of its own."""
    model, fmt = _setup(tiny_tokenizer, K=2)
    ex = _with_long_reply()
    with caplog.at_level("WARNING"):
        batched = generate_spt(model, tiny_tokenizer, fmt, ex, GenerateConfig(max_new_tokens=3, batch_size=4))
    assert "1 of 4 reference(s) not scored" in caplog.text
    alone = generate_spt(model, tiny_tokenizer, fmt, ex, GenerateConfig(max_new_tokens=3, batch_size=1))
    assert batched[1].ref_nll is None and batched[1].ref_tokens == 0 and batched[1].ref_nll_by_prompt is None
    for i in (0, 2, 3):
        assert batched[i].ref_tokens == alone[i].ref_tokens > 1
        assert batched[i].ref_nll_by_prompt == pytest.approx(alone[i].ref_nll_by_prompt, rel=1e-4)
        assert batched[i].ref_nll == batched[i].ref_nll_by_prompt[batched[i].prompt]


def test_over_long_reference_without_a_prompt_bank(tiny_tokenizer, caplog):
    """The same for methods without a bank (textual, finetune, lora): generate_text."""
    from spt.generate import generate_text
    from spt.methods import LMOnly

    model = LMOnly(make_tiny_lm("gpt2", len(tiny_tokenizer))).eval()
    fmt = DialogueFormatter(tiny_tokenizer, max_length=200)
    ex = _with_long_reply()
    with caplog.at_level("WARNING"):
        batched = generate_text(model, tiny_tokenizer, fmt, ex, GenerateConfig(max_new_tokens=3, batch_size=4))
    assert "1 of 4 reference(s) not scored" in caplog.text
    alone = generate_text(model, tiny_tokenizer, fmt, ex, GenerateConfig(max_new_tokens=3, batch_size=1))
    assert batched[1].ref_nll is None and batched[1].ref_tokens == 0
    for i in (0, 2, 3):
        assert batched[i].ref_tokens == alone[i].ref_tokens > 1
        assert batched[i].ref_nll == pytest.approx(alone[i].ref_nll, rel=1e-4) and batched[i].ref_nll > 0


def test_max_new_tokens_that_leaves_no_room_is_a_clear_error(tiny_tokenizer):
    model, fmt = _setup(tiny_tokenizer, K=2)
    with pytest.raises(ValueError, match=r"generate\.max_new_tokens=199 leaves no room"):
        generate_spt(model, tiny_tokenizer, fmt, synth_examples(1, seed=1)[:1], GenerateConfig(max_new_tokens=199))


def _left_padded(tiny_tokenizer, n=5):
    from spt.generate import left_pad

    fmt = DialogueFormatter(tiny_tokenizer, max_length=200)
    rows = [fmt.encode_prompt(e.persona, e.context) for e in synth_examples(3, seed=2)[:n]]
    assert len({len(r) for r in rows}) > 1
    return left_pad(rows, tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_growing_cache_generates_what_transformers_own_cache_does(kind, tiny_tokenizer, monkeypatch):
    """The in-place KV cache gives the tokens transformers' concatenating cache gives, for greedy, beam search
    (which reorders the cache) and seeded sampling, and greedy decoding allocates each layer's buffer once."""
    from spt.generate import GrowingLayer, generation_kwargs, lm_generate

    lm = make_tiny_lm(kind, len(tiny_tokenizer))
    ids, mask = _left_padded(tiny_tokenizer)
    buffers = []
    update = GrowingLayer.update
    monkeypatch.setattr(GrowingLayer, "update", lambda self, *a, **k: (update(self, *a, **k), buffers.append(
        (id(self), self._k.data_ptr(), self._k.shape[-2])))[0])
    for options in ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 20}):
        cfg = GenerateConfig(max_new_tokens=10, **options)
        kw = generation_kwargs(cfg, tiny_tokenizer)
        torch.manual_seed(0)
        reference = lm.generate(input_ids=ids, attention_mask=mask, **kw)
        buffers.clear()
        torch.manual_seed(0)
        ours = lm_generate(lm, cfg, kw, mask, input_ids=ids)
        assert torch.equal(ours, reference), options
        assert len(buffers) >= 2 * 10  # every layer's update went through the growing cache
        if not options:  # one buffer per layer for the whole call, sized for the input and max_new_tokens
            assert len(set(buffers)) == 2 and {b[2] for b in buffers} == {ids.shape[1] + 10 + 1}


def test_bf16_prefill_fills_the_cache_in_the_lms_precision(tiny_tokenizer, monkeypatch):
    from spt.generate import generation_kwargs, lm_generate

    lm = make_tiny_lm("llama", len(tiny_tokenizer))
    ids, mask = _left_padded(tiny_tokenizer)
    calls = []
    forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **k: calls.append(
        (torch.is_autocast_enabled("cpu"), k["cache"].layers[0].keys.dtype if k["cache"].layers else None,
         (k.get("input_ids") if k.get("input_ids") is not None else k["inputs_embeds"]).shape[1])) or forward(*a, **k))
    logits = {}
    for precision in ("fp32", "bf16"):
        cfg = GenerateConfig(max_new_tokens=2, prefill_precision=precision)
        kw = {**generation_kwargs(cfg, tiny_tokenizer), "output_logits": True, "return_dict_in_generate": True}
        calls.clear()
        logits[precision] = lm_generate(lm, cfg, kw, mask, input_ids=ids).logits[0]
        if precision == "bf16":  # the prefill under autocast, then the last input position and one new token
            assert [c[0] for c in calls] == [True, False, False]
            assert calls[0][2] == ids.shape[1] - 1 and calls[1][1] == torch.float32
        else:
            assert not any(c[0] for c in calls) and calls[0][2] == ids.shape[1]
    diff = (logits["bf16"] - logits["fp32"]).abs().max().item()
    assert 0 < diff < 0.05 * logits["fp32"].abs().max().item()


def test_models_with_sliding_windows_keep_transformers_cache():
    from transformers import MistralConfig, MistralForCausalLM

    from spt.generate import GrowingCache, kv_cache

    cfg = dict(vocab_size=64, num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=32)
    assert kv_cache(MistralForCausalLM(MistralConfig(**cfg, sliding_window=8))) is None
    assert isinstance(kv_cache(MistralForCausalLM(MistralConfig(**cfg, sliding_window=None))), GrowingCache)
