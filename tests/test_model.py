import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_lm
from spt import losses
from spt.batching import EncodedDataset, PersonaSimilarity, collate
from spt.config import SPTConfig
from spt.data.synth import synth_examples
from spt.format import IGNORE_INDEX, DialogueFormatter
from spt.model import SPTModel, causal_suffices, splice
from spt.retriever import Retriever


def test_splice_right_and_left_padding():
    n, d = 2, 3
    prompts = torch.arange(2 * n * d, dtype=torch.float).view(2, n, d) + 100
    embeds = torch.arange(2 * 4 * d, dtype=torch.float).view(2, 4, d)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])  # row 0 right-padded, row 1 left-padded
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, -100, 7]])
    sp = splice(prompts, embeds, mask, labels)
    assert sp.inputs_embeds.shape == (2, n + 4, d)
    assert sp.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert torch.equal(sp.inputs_embeds[0, :n], prompts[0]) and torch.equal(sp.inputs_embeds[0, n:], embeds[0])
    assert torch.equal(sp.inputs_embeds[1, 2:4], prompts[1])  # (pad, pad, prompt, prompt, text, text)
    assert torch.equal(sp.inputs_embeds[1, 4:], embeds[1, 2:])
    assert sp.labels.tolist() == [[-100, -100, -100, 5, 6, -100], [-100, -100, -100, -100, -100, 7]]
    assert sp.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]


def test_selection_loss_is_hand_computed_kl():
    L = torch.tensor([[1.0, 2.0], [2.0, 0.5]])  # (K=2, B=2)
    S = torch.tensor([[0.3, 0.1], [0.2, 0.9]])
    expected = 0.0
    for b in range(2):
        q = [math.exp(-L[k, b]) for k in range(2)]
        q = [v / sum(q) for v in q]
        p = [math.exp(S[k, b]) for k in range(2)]
        p = [v / sum(p) for v in p]
        expected += sum(q[k] * math.log(q[k] / p[k]) for k in range(2))
    assert losses.selection_loss(L, S).item() == pytest.approx(expected / 2, abs=1e-6)
    # temperatures scale the logits of both distributions
    assert losses.selection_loss(L, S, tau_gold=2.0, tau_sim=0.5).item() == pytest.approx(
        losses.selection_loss(L / 2, S * 2).item(), abs=1e-6)
    noisy = losses.selection_loss(L, S, sigma=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(noisy) and noisy.item() != pytest.approx(expected / 2, abs=1e-9)


def test_contrastive_targets_follow_bleu_threshold():
    sim = PersonaSimilarity(["i like cats . i ski .", "i like cats . i ski .", "my job is a pilot ."])
    m = sim.matrix(torch.tensor([0, 1, 2, 0]))
    assert m[0, 1] > 20 and m[0, 2] < 20 and m[0, 3] == 100.0
    T = losses.contrastive_targets(m, threshold=20.0)
    assert T[0, 1] == 1 and T[0, 2] == -1 and T[1, 2] == -1 and T[0, 3] == 1
    assert sim.pair(0, 2) == sim._cache[(0, 2)]  # cached


def test_contrastive_loss_by_hand():
    S = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # columns: e1, e2, (e1+e2)/|.|
    T = torch.tensor([[1, 1, -1], [1, 1, 1], [-1, 1, 1]], dtype=torch.float)
    c = 1 / math.sqrt(2)
    # pairs (0,1): +1, cos 0 -> 1; (0,2): -1, cos c -> c; (1,2): +1, cos c -> 1 - c
    assert losses.contrastive_loss(S, T).item() == pytest.approx((1 + c + (1 - c)) / 3, abs=1e-6)
    assert losses.contrastive_loss(S[:, :1], T[:1, :1]).item() == 0.0


def test_fusion_loss_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (5,))
    token_example = torch.tensor([0, 0, 1, 1, 1])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # example 0 uses prompt 0 only, example 1 prompt 1 only
    expected = F.cross_entropy(torch.cat([logits[0, :2], logits[1, 2:]]), targets)
    assert losses.fusion_loss(logits, targets, w, token_example).item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(losses.fusion_weights(w, "softmax").sum(0), torch.ones(2))


def test_retriever_pooling_ignores_padding():
    torch.manual_seed(0)
    r = Retriever(8)
    prompts, x = torch.randn(3, 2, 8), torch.randn(1, 5, 8)
    s1 = r(prompts, x, torch.ones(1, 5))
    padded = torch.cat([x, torch.randn(1, 4, 8) * 50], 1)
    s2 = r(prompts, padded, torch.tensor([[1] * 5 + [0] * 4]))
    assert s1.shape == (3, 1) and torch.allclose(s1, s2, atol=1e-6)
    assert (s1 > 0).all()  # softplus
    rt = Retriever(8, kind="transformer")
    assert rt(prompts, padded, torch.tensor([[1] * 5 + [0] * 4])).shape == (3, 1)


def _batch(tokenizer, n=5, max_length=160):
    ds = EncodedDataset(synth_examples(3, seed=1)[:n], DialogueFormatter(tokenizer, max_length))
    return collate([ds[i] for i in range(len(ds))], tokenizer.pad_token_id)


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_batched_k_prompt_forward_equals_separate_forwards(kind, tiny_tokenizer):
    lm = make_tiny_lm(kind, len(tiny_tokenizer))
    model = SPTModel(lm, SPTConfig(K=3, num_virtual_tokens=4), seed=1).eval()
    batch = _batch(tiny_tokenizer)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "query_mask")}
    with torch.no_grad():
        L = model.pairs(**inputs).L  # (K, B) from one K*B batch, LM head on response positions only
        model.chunk_size = 4  # chunked rows must give the same numbers
        L_chunked = model.pairs(**inputs).L
        for k in range(3):  # reference: plain HF forward per prompt, full logits, our own masking
            for b in range(batch["input_ids"].shape[0]):
                n_tok = int(batch["attention_mask"][b].sum())
                ids = batch["input_ids"][b:b + 1, :n_tok]
                emb = torch.cat([model.prompts[k:k + 1], lm.get_input_embeddings()(ids)], 1)
                logits = lm(inputs_embeds=emb).logits[0]
                labels = torch.cat([torch.full((4,), IGNORE_INDEX), batch["labels"][b, :n_tok]])
                ref = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)
                assert L[k, b].item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(L, L_chunked, atol=1e-5)


def test_causal_suffices_only_without_padding_before_a_real_token():
    assert causal_suffices(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))  # right-padded
    assert not causal_suffices(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left-padded (generation)
    assert not causal_suffices(torch.tensor([[1, 0, 1]]))  # a hole


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_dropping_the_mask_of_right_padded_rows_changes_no_loss_or_gradient(kind, tiny_tokenizer, monkeypatch):
    """Training rows run without an attention mask (causal attention alone hides right padding); the losses
    and every trainable gradient equal those of the masked forward."""
    import spt.model as spt_model

    lm = make_tiny_lm(kind, len(tiny_tokenizer))
    model = SPTModel(lm, SPTConfig(K=3, num_virtual_tokens=4), seed=1)
    batch = _batch(tiny_tokenizer)
    assert (batch["attention_mask"] == 0).any()  # the rows really are padded
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "query_mask")}
    seen = []
    forward = lm.base_model.forward
    monkeypatch.setattr(lm.base_model, "forward",
                        lambda *a, **kw: seen.append(kw["attention_mask"]) or forward(*a, **kw))

    def run():
        out = model(**inputs)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out, grads

    out, grads = run()
    assert seen[-1] is None
    monkeypatch.setattr(spt_model, "causal_suffices", lambda mask: False)
    ref, ref_grads = run()
    assert seen[-1] is not None
    for key in ("loss", "llm", "sel", "fus"):
        assert out[key].item() == pytest.approx(ref[key].item(), abs=1e-6)
    assert set(grads) == set(ref_grads) and "prompts" in grads
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-6), name


@pytest.mark.parametrize("recipe", ["paper", "routed"])
def test_training_changes_prompts_and_retriever_not_lm(tiny_tokenizer, recipe):
    lm = make_tiny_lm("gpt2", len(tiny_tokenizer))
    frozen = {k: v.clone() for k, v in lm.state_dict().items()}
    model = SPTModel(lm, SPTConfig(K=2, num_virtual_tokens=2, recipe=recipe), seed=0)
    batch = _batch(tiny_tokenizer)
    if recipe == "routed":
        model.init_routing([(model.embed(batch["input_ids"]), batch["query_mask"])])
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sim = PersonaSimilarity(["a b c", "d e f"]).matrix(torch.tensor([0, 1, 0, 1, 0]))
    for _ in range(3):
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "query_mask")},
                    persona_sim=sim)
        assert set(out) >= {"loss", "llm", "sel", "fus", "ctr"} and torch.isfinite(out["loss"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    after = model.trainable_state_dict()
    assert not torch.equal(before["prompts"], after["prompts"])
    assert not torch.equal(before["retriever.normalizer.weight"], after["retriever.normalizer.weight"])
    assert all(torch.equal(frozen[k], v) for k, v in lm.state_dict().items())
    assert not any(p.requires_grad for p in lm.parameters())
    routed = {"retriever.center", "retriever.keys"} if recipe == "routed" else set()
    assert set(after) == {"prompts", "retriever.normalizer.weight", "retriever.normalizer.bias"} | routed
    if recipe == "routed":  # the keys learn; the centre is data, set once
        assert not torch.equal(before["retriever.keys"], after["retriever.keys"])
        assert torch.equal(before["retriever.center"], after["retriever.center"])


def test_k1_without_aux_losses_is_plain_lm_loss(tiny_tokenizer):
    model = SPTModel(make_tiny_lm("gpt2", len(tiny_tokenizer)), SPTConfig(K=1, num_virtual_tokens=2))
    batch = _batch(tiny_tokenizer)
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "query_mask")})
    assert out["sel"].item() == out["fus"].item() == out["ctr"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["llm"].item())


def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_tokenizer, tmp_path):
    from spt.config import load_config, parse_overrides
    from spt.methods import SPTMethod

    path = tmp_path / "lm"
    tiny_tokenizer.save_pretrained(path)
    make_tiny_lm("gpt2", len(tiny_tokenizer)).save_pretrained(path)
    grads = []
    for ckpt in ("false", "true"):
        args = [f"--model.name_or_path={path}", "--spt.K=2", "--spt.num_virtual_tokens=2", "--data.max_length=256",
                f"--model.gradient_checkpointing={ckpt}"]
        cfg = load_config(None, parse_overrides(args))
        method = SPTMethod(cfg)
        method.model.eval()
        method.model.train()
        assert method.model.lm.training == (ckpt == "true")  # HF checkpoints only in train mode
        assert all(m.p == 0.0 for m in method.model.lm.modules() if isinstance(m, torch.nn.Dropout))
        batch = _batch(tiny_tokenizer)
        out = method.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "query_mask")})
        out["loss"].backward()
        grads.append((out["loss"].item(), method.model.prompts.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert grads[1][1].abs().sum() > 0 and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
