"""The routing recipe: centring, k-means keys, routed LM loss, load balance, fp32 scores, the paper preset."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_lm
from spt import losses
from spt.config import RECIPES, ConfigError, SPTConfig, load_config
from spt.model import SPTModel, response_logits
from spt.retriever import Retriever, spherical_kmeans


def test_recipes_fill_unset_fields_and_explicit_values_win(tmp_path):
    paper, routed = SPTConfig(recipe="paper"), SPTConfig()
    for name, value in RECIPES["paper"].items():
        assert getattr(paper, name) == value
    for name, value in RECIPES["routed"].items():
        assert getattr(routed, name) == value
    assert SPTConfig(recipe="paper", tau_sim=0.5).tau_sim == 0.5
    cfg = load_config(None, {"spt.recipe": "paper", "spt.lambda_bal": 0.3})
    assert (cfg.spt.keys, cfg.spt.lambda_bal, cfg.spt.center_features) == ("prompt_mean", 0.3, False)
    cfg.save(tmp_path / "c.yaml")  # the saved config holds resolved values and reloads to the same
    assert load_config(tmp_path / "c.yaml").spt == cfg.spt
    with pytest.raises(ConfigError, match=r"spt\.recipe"):
        load_config(None, {"spt.recipe": "magic"})
    with pytest.raises(ConfigError, match=r"spt\.lambda_bal"):
        load_config(None, {"spt.lambda_bal": -1.0})


def test_pt_has_no_routing_terms():
    cfg = load_config(None, {"method": "pt"})
    assert cfg.spt.K == 1 and cfg.spt.lambda_bal == 0.0 and cfg.spt.lm_weighting == "uniform"


def test_spherical_kmeans_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(3, 8) * 5.0  # three orthogonal directions, 20 noisy points each
    x = torch.cat([d + 0.3 * torch.randn(20, 8, generator=g) for d in dirs])
    centroids, assign = spherical_kmeans(x, 3, generator=g)
    truth = torch.arange(3).repeat_interleave(20)
    # each true cluster maps to exactly one found cluster, and the centroids are the directions
    assert {(int(t), int(a)) for t, a in zip(truth, assign, strict=True)}.__len__() == 3
    for k in range(3):
        found = int(assign[truth == k][0])
        assert F.cosine_similarity(centroids[found], dirs[k], dim=0) > 0.98
    assert torch.allclose(centroids.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="at least K"):
        spherical_kmeans(x[:2], 3)


def test_centred_features_subtract_the_stored_mean():
    r = Retriever(4, K=2, center=True)
    r.center.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    emb = torch.tensor([[[2.0, 2.0, 2.0, 2.0], [4.0, 6.0, 8.0, 10.0], [9.0, 9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the padded token never counts
    assert torch.allclose(r.features(emb, mask), torch.tensor([[2.0, 2.0, 2.0, 2.0]]))
    assert torch.allclose(Retriever(4).features(emb, mask), torch.tensor([[3.0, 4.0, 5.0, 6.0]]))


def test_routed_lm_loss_by_hand():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # K=2, M=3 tokens
    token_example = torch.tensor([0, 0, 1])  # tokens 0, 1 of example 0; token 2 of example 1
    w = torch.tensor([[0.9, 0.2], [0.1, 0.8]])  # (K, B)
    expected = (0.9 * 1 + 0.9 * 2 + 0.2 * 3 + 0.1 * 4 + 0.1 * 5 + 0.8 * 6) / 3
    assert losses.routed_lm_loss(nll, w, token_example).item() == pytest.approx(expected)
    uniform = torch.full((2, 2), 0.5)
    assert losses.routed_lm_loss(nll, uniform, token_example).item() == pytest.approx(losses.lm_loss(nll).item())
    w.requires_grad_(True)
    nll.requires_grad_(True)
    losses.routed_lm_loss(nll, w, token_example).backward()
    assert w.grad is None  # the routing weights get no gradient from the LM loss
    assert torch.allclose(nll.grad, torch.tensor([[0.9, 0.9, 0.2], [0.1, 0.1, 0.8]]) / 3)


def test_balance_loss_by_hand():
    K = 4
    assert losses.balance_loss(torch.full((K, 6), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.zeros(K, 6)
    one[2] = 1.0
    assert losses.balance_loss(one).item() == pytest.approx(math.log(K), abs=1e-5)
    p = torch.tensor([[0.7, 0.1], [0.3, 0.9]])  # batch mean (0.4, 0.6)
    kl = 0.4 * math.log(0.4 / 0.5) + 0.6 * math.log(0.6 / 0.5)
    assert losses.balance_loss(p).item() == pytest.approx(kl, abs=1e-6)
    running = torch.tensor([0.8, 0.2])  # m = 0.5 * running + 0.5 * mean = (0.6, 0.4)
    kl = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert losses.balance_loss(p, running, 0.5).item() == pytest.approx(kl, abs=1e-6)


def test_softmax_fusion_uses_the_routing_temperature():
    S = torch.tensor([[0.9, 0.1], [0.5, 0.6]])
    w = losses.fusion_weights(S, "softmax", tau_sim=0.1)
    assert torch.allclose(w, torch.softmax(S / 0.1, 0)) and torch.allclose(w.sum(0), torch.ones(2))
    assert torch.equal(losses.fusion_weights(S, "raw", 0.1), S)


def _fixed_batch(vocab=64):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 10
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0
    mask[3, 6:] = 0
    labels = torch.full((B, T), -100)
    qm = torch.zeros(B, T, dtype=torch.long)
    for b, (q, e) in enumerate([(5, 10), (4, 8), (7, 10), (3, 6)]):
        qm[b, :q] = 1
        labels[b, q:e] = ids[b, q:e]
    sim = torch.tensor([[0, 30.0, 5, 50], [0, 0, 10, 25], [0, 0, 0, 1], [0, 0, 0, 0]])
    return ids, mask, labels, qm, sim


def test_paper_recipe_reproduces_the_previous_numbers_on_a_fixed_batch():
    """Values computed by spt before the routing recipe existed (commit af4a729), same weights and batch."""
    torch.manual_seed(0)
    model = SPTModel(make_tiny_lm("gpt2", 64), SPTConfig(K=3, num_virtual_tokens=2, recipe="paper"), seed=0)
    ids, mask, labels, qm, sim = _fixed_batch()
    out = model(ids, mask, labels, qm, persona_sim=sim)
    expected = {"llm": 4.196398, "sel": 0.006516, "fus": 4.159132, "ctr": 0.648227, "loss": 8.617426, "bal": 0.0}
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, abs=2e-6), name
    S = model.pairs(ids, mask, labels, qm).S
    assert S[:, 0].tolist() == pytest.approx([0.0034, 0.2787, 0.5391], abs=1e-4)


def test_scores_and_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = SPTModel(make_tiny_lm("gpt2", 64), SPTConfig(K=3, num_virtual_tokens=2), seed=0).eval()
    ids, mask, labels, qm, _ = _fixed_batch()
    model.init_routing([(model.embed(ids), qm)])
    with torch.no_grad():
        S32 = model.scores(model.embed(ids), qm)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = model.pairs(ids, mask, labels, qm)
            logits, _ = response_logits(model.lm, model.embed(ids), mask, None, labels)
    assert p.S.dtype == p.L.dtype == p.nll.dtype == logits.dtype == torch.float32
    assert torch.equal(p.S, S32)  # not merely close: the retriever never runs in bf16


def test_init_routing_centres_and_spreads_the_first_routing():
    torch.manual_seed(0)
    lm = make_tiny_lm("gpt2", 64, width=16)
    model = SPTModel(lm, SPTConfig(K=2, num_virtual_tokens=2), seed=0)
    table = lm.get_input_embeddings().weight.detach()
    # two kinds of context: tokens 1-5 or tokens 30-34, plus a shared "template" token 60
    ids = torch.tensor([[60, *range(1, 6)]] * 6 + [[60, *range(30, 35)]] * 6)
    ids[::2, 1] = 7  # some variety inside each kind
    qm = torch.ones_like(ids)
    assign = model.init_routing([(model.embed(ids), qm)])
    feats = table[ids].mean(1)
    assert torch.allclose(model.retriever.center, feats.mean(0), atol=1e-6)
    assert sorted(torch.bincount(assign).tolist()) == [6, 6]  # k-means separates the kinds
    k = model.scores(model.embed(ids), qm).argmax(0)
    assert len(set(k[:6].tolist())) == 1 and len(set(k[6:].tolist())) == 1 and k[0] != k[6]


def _marker_batch(g: torch.Generator, B: int):
    """Contexts of 12 random "persona" tokens (1-20) and one marker (21 or 22) that decides the response:
    marker 21 -> tokens 30-33, marker 22 -> tokens 40-43. The right prompt for an example is known, but
    the marker is a small part of the pooled context, so k-means alone does not find it."""
    group = torch.randint(0, 2, (B,), generator=g)
    persona = torch.randint(1, 21, (B, 12), generator=g)
    marker = (21 + group).unsqueeze(1)
    response = torch.where(group.unsqueeze(1) == 0, torch.arange(30, 34), torch.arange(40, 44))
    ids = torch.cat([persona, marker, torch.full((B, 1), 60), response, torch.zeros(B, 1, dtype=torch.long)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 14:] = ids[:, 14:]
    qm = torch.zeros_like(ids)
    qm[:, :14] = 1
    return ids, torch.ones_like(ids), labels, qm, group


def _steerable_lm():
    """A tiny random GPT-2 whose logits can move: at the usual init (std 0.02, tied head) every output is
    close to uniform whatever the input, and no soft prompt could change what it says."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_positions=64, initializer_range=0.3)
    return GPT2LMHeadModel(cfg).eval()


def _routing_accuracy(k: torch.Tensor, group: torch.Tensor) -> float:
    same = (k == group).float().mean().item()
    return max(same, 1 - same)  # under the best prompt <-> group matching


def test_routed_recipe_learns_to_route_where_the_right_prompt_is_known():
    torch.manual_seed(0)
    model = SPTModel(_steerable_lm(), SPTConfig(K=2, num_virtual_tokens=2, lambda_ctr=0.0), seed=0)
    g = torch.Generator().manual_seed(0)
    ids, mask, labels, qm, _ = _marker_batch(g, 256)
    model.init_routing([(model.embed(ids), qm)])
    test = _marker_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        start = _routing_accuracy(model.scores(model.embed(test[0]), test[3]).argmax(0), test[4])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(80):
        ids, mask, labels, qm, _ = _marker_batch(g, 16)
        out = model(ids, mask, labels, qm)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        p = model.pairs(*test[:4])
    k = p.S.argmax(0)
    acc = _routing_accuracy(k, test[4])
    assert acc >= 0.9, f"routing accuracy {acc:.2f} (at the start {start:.2f})"
    # the prompts specialised: the selected prompt is the one with the lower loss, by a margin
    assert (k == p.L.argmin(0)).float().mean() >= 0.9
    assert (p.L.gather(0, k[None])[0] - p.L.mean(0)).mean() < -0.05


def test_lm_hidden_query_is_the_last_context_state_whatever_the_padding():
    torch.manual_seed(0)
    lm = make_tiny_lm("gpt2", 64)
    model = SPTModel(lm, SPTConfig(K=2, num_virtual_tokens=2, query="lm_hidden"), seed=0).eval()
    ctx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lm.base_model(input_ids=ctx).last_hidden_state[0, -1]
        right = torch.tensor([[5, 6, 7, 8, 9, 9, 0]])  # context, then response tokens and padding
        right_q = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
        left = torch.tensor([[0, 0, 5, 6, 7, 8]])  # generation's left padding
        left_q = torch.tensor([[0, 0, 1, 1, 1, 1]])
        for ids, q in ((right, right_q), (left, left_q)):
            tokens, mask = model.query(ids, q)
            assert mask.sum().item() == 1
            pooled = (tokens * mask.unsqueeze(-1)).sum(1)[0]
            assert torch.allclose(pooled, expected, atol=1e-5)
    emb_model = SPTModel(lm, SPTConfig(K=2, num_virtual_tokens=2), seed=0)
    tokens, mask = emb_model.query(right, right_q)
    assert torch.equal(mask, right_q) and torch.equal(tokens, lm.get_input_embeddings()(right))


def test_selection_loss_replays_recent_batches():
    torch.manual_seed(0)
    model = SPTModel(make_tiny_lm("gpt2", 64), SPTConfig(K=3, num_virtual_tokens=2, sel_replay=2), seed=0)
    ids, mask, labels, qm, _ = _fixed_batch()
    model.init_routing([(model.embed(ids), qm)])
    model.train()
    first = model.pairs(ids, mask, labels, qm)
    model(ids, mask, labels, qm)  # stores this batch's features and target
    assert len(model._replay) == 1
    feats, q_old = model._replay[0]
    assert torch.equal(feats, first.features)
    second = model(ids[:2], mask[:2], labels[:2], qm[:2])
    # the loss now covers the stored batch (re-scored with the current retriever) and the new one
    p = model.pairs(ids[:2], mask[:2], labels[:2], qm[:2])
    route = losses.routing_probs(p.S, model.cfg.tau_sim)
    L_sum = losses.per_example_sum(p.nll, p.token_example, 2)
    q_new = losses.selection_target(L_sum, model.cfg.tau_gold, route, balanced=model.cfg.balance_target)
    S_all = torch.cat([model.retriever.score_features(model.prompts, feats), p.S], 1)
    expected = losses.selection_loss(None, S_all, tau_sim=model.cfg.tau_sim, q=torch.cat([q_old, q_new], 1))
    assert second["sel"].item() == pytest.approx(expected.item(), rel=1e-5)
    model(ids, mask, labels, qm)
    assert len(model._replay) == 2  # at most sel_replay batches are kept
    model.eval()
    model(ids, mask, labels, qm)
    assert len(model._replay) == 2  # evaluation never adds to it


def test_posterior_target_keeps_the_prior_where_losses_agree():
    prior = torch.tensor([[0.7, 0.2], [0.3, 0.8]])
    same = torch.full((2, 2), 3.0)
    assert torch.allclose(losses.selection_target(same, 1.0, prior), prior)
    # the paper's target is uniform there, whatever the routing was
    assert torch.allclose(losses.selection_target(same, 1.0), torch.full((2, 2), 0.5))
    L = torch.tensor([[1.0, 2.0], [2.0, 2.0]])  # prompt 0 explains example 0 better by 1 nat
    q = losses.selection_target(L, 1.0, prior)
    assert q[0, 0].item() == pytest.approx(0.7 * math.e / (0.7 * math.e + 0.3))
    assert torch.allclose(q[:, 1], prior[:, 1])


def test_sinkhorn_balances_and_assigns_by_relative_advantage():
    # prompt 0 is better on both examples, but by more on example 0: balanced, example 1 goes to prompt 1
    logits = torch.tensor([[0.0, -1.0], [-3.0, -1.5]])
    q = losses.sinkhorn(logits, iters=50)
    assert torch.allclose(q.sum(0), torch.ones(2), atol=1e-5)  # each example's q is a distribution
    assert torch.allclose(q.sum(1), torch.ones(2), atol=1e-3)  # each prompt gets B / K = 1 example
    assert q[0, 0] > 0.5 and q[1, 1] > 0.5
    assert torch.softmax(logits, 0)[0].min() > 0.5  # unbalanced, prompt 0 would take both


def test_checkpoints_from_before_recipes_load_as_the_paper_recipe(tmp_path):
    import yaml

    from spt.checkpoint import checkpoint_config
    from spt.config import Config

    saved = Config().to_dict()
    for name in (*RECIPES["paper"], "recipe", "sel_replay"):
        saved["spt"].pop(name, None)
    saved["spt"].update({"tau_gold": 1.0, "tau_sim": 1.0, "fusion_weights": "raw", "lambda_fus": 1.0,
                         "lambda_ctr": 0.4})  # what spt saved then
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = checkpoint_config(tmp_path)
    assert cfg.spt.recipe == "paper" and cfg.spt.keys == "prompt_mean" and not cfg.spt.center_features
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(Config().to_dict()))  # a checkpoint of today
    assert checkpoint_config(tmp_path).spt.recipe == "routed"


def test_retriever_learning_rate_gets_its_own_parameter_group():
    from spt.config import Config
    from spt.train import param_groups

    model = SPTModel(make_tiny_lm("gpt2", 64), SPTConfig(K=2, num_virtual_tokens=2), seed=0)
    cfg = Config()
    assert len(param_groups(model, cfg)) == 1  # unset: one learning rate for all
    cfg.spt.retriever_lr = 1e-3
    prompts, retriever = param_groups(model, cfg)
    assert [p.shape for p in prompts["params"]] == [model.prompts.shape] and "lr" not in prompts
    assert retriever["lr"] == 1e-3
    assert {id(p) for p in retriever["params"]} == {id(p) for p in model.retriever.parameters()}
