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
