"""Property tests of spt/format.py: what the formatter promises in its docstrings, for any text.

- Only ``{response}<eos>`` carries labels (everything else is -100) and the inference input is
  everything up to and including the final ``R:``.
- Truncation to ``max_length`` never cuts the response: it drops the oldest context turns first
  (whole), then persona tokens from the left, and the newest context turn last.
- ``encode_prompt`` equals ``encode(example).prompt_ids`` when nothing is cut.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spt.data import Example
from spt.format import IGNORE_INDEX, DialogueFormatter, ResponseTooLong, render_segments, render_text

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text of every kind: plain words, any Unicode (no lone surrogates: no reader lets those through),
# whitespace-only, combining marks, emoji, and strings that look like the template or a special token.
_tricky = st.sampled_from(["", " ", "\t\n", "R:", " Q: x", "; context:", "<|endoftext|>", "e\u0301", "😀👍🏽",
                           "\u3000x\u3000", "ﬁ", "a\x00b", "' s", "123 456"])
_words = st.from_regex(r"[a-z][a-z ,.!?']{0,40}", fullmatch=True)
text = st.one_of(_words, st.text(max_size=30), _tricky)
long_text = st.builds(lambda s, n: (s + " ") * n, _words, st.integers(20, 120))  # up to ~5000 characters
persona = st.lists(st.one_of(text, long_text), max_size=6)
context = st.lists(st.one_of(text, long_text), max_size=7)
response = st.one_of(text, st.builds(lambda s, n: (s + " ") * n, _words, st.integers(1, 8)))


@pytest.fixture(scope="module", params=["tiny_tokenizer", "gpt2_tokenizer"])
def tok(request):
    return request.getfixturevalue(request.param)


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _pieces(fmt: DialogueFormatter, ex: Example) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    """header, turns, tail (" R:") and target (response + EOS) as the formatter tokenises them."""
    segments = [*render_segments(ex.persona, ex.context), " " + ex.response.strip()]
    pieces = fmt._tokenize_segments(segments)
    m = len(ex.context)
    return pieces[0], pieces[1:m + 1], pieces[m + 1], [*pieces[-1], fmt.eos]


@SETTINGS
@given(persona=persona, context=context, response=response)
def test_labels_cover_exactly_response_and_eos(tok, persona, context, response):
    ex = Example(tuple(persona), tuple(context), response)
    enc = DialogueFormatter(tok, max_length=10**6).encode(ex)
    n = enc.prompt_len
    assert len(enc.input_ids) == len(enc.labels) and 0 < n < len(enc.input_ids)
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:] and IGNORE_INDEX not in enc.labels[n:]
    assert enc.labels[-1] == tok.eos_token_id
    # the labelled tokens are the response's text and nothing else; the unlabelled ones the template up to "R:"
    assert _decode(tok, enc.input_ids[n:-1]) == " " + response.strip()
    assert _decode(tok, enc.prompt_ids) == (tok.bos_token or "") + render_text(persona, context)
    assert enc.prompt_ids == DialogueFormatter(tok, max_length=10**6).encode_prompt(persona, context)


@SETTINGS
@given(persona=persona, context=context, response=response)
def test_segments_tokenise_the_whole_text_once(tok, persona, context, response):
    fmt = DialogueFormatter(tok, max_length=10**6)
    segments = [*render_segments(persona, context), " " + response.strip()]
    pieces = fmt._tokenize_segments(segments)
    assert len(pieces) == len(segments)
    whole = tok("".join(segments), add_special_tokens=False)["input_ids"]
    assert [t for p in pieces for t in p] == whole
    assert [_decode(tok, p) for p in pieces] == segments  # every cut falls on a segment boundary


def _split_prompt(middle: list[int], header: list[int], turns: list[list[int]]):
    """All ways to read ``middle`` as header[-h:] + turns[j:-1] (whole) + turns[-1][-k:]:
    yields (h, j, k) (j = index of the oldest kept older turn, len(turns) - 1 if none)."""
    m = len(turns)
    if m == 0:
        if middle == header[len(header) - len(middle):]:
            yield len(middle), 0, 0
        return
    newest = turns[-1]
    for k in range(len(newest) + 1):
        if k and middle[len(middle) - k:] != newest[len(newest) - k:]:
            break
        rest = middle[:len(middle) - k]
        for j in range(m - 1, -1, -1):
            older = [t for turn in turns[j:m - 1] for t in turn]
            if len(older) > len(rest):
                break
            if rest[len(rest) - len(older):] != older:
                continue
            h = len(rest) - len(older)
            if rest[:h] == header[len(header) - h:]:
                yield h, j, k


@SETTINGS
@given(persona=persona, context=context, response=response, max_length=st.integers(8, 400))
def test_truncation_never_touches_the_response(tok, persona, context, response, max_length):
    ex = Example(tuple(persona), tuple(context), response)
    fmt = DialogueFormatter(tok, max_length=max_length)
    full = DialogueFormatter(tok, max_length=10**6).encode(ex)
    header, turns, tail, target = _pieces(fmt, ex)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if len(bos) + len(tail) + len(target) > max_length:
        with pytest.raises(ResponseTooLong):
            fmt.encode(ex)
        return
    enc = fmt.encode(ex)
    assert len(enc.input_ids) <= max_length
    assert enc.input_ids[enc.prompt_len:] == target == full.input_ids[full.prompt_len:]  # the response is whole
    assert enc.labels == [IGNORE_INDEX] * enc.prompt_len + target
    if len(full.input_ids) <= max_length:
        assert enc == full  # nothing to cut, nothing cut
        return
    prompt = enc.prompt_ids
    assert prompt[:len(bos)] == bos and prompt[len(prompt) - len(tail):] == tail
    middle = prompt[len(bos):len(prompt) - len(tail)]
    ways = list(_split_prompt(middle, header, turns))
    assert ways, "the prompt is not header suffix + whole older turns + newest-turn suffix"

    def follows_the_policy(h: int, j: int, k: int) -> bool:
        m = len(turns)
        newest_cut = m > 0 and k < len(turns[-1])
        persona_cut = h < len(header)
        older_dropped = m > 1 and j > 0
        if newest_cut and (h > 0 or j < m - 1):  # the newest turn goes last
            return False
        if persona_cut and j < m - 1:  # older turns go before persona tokens
            return False
        if (newest_cut or persona_cut) and len(enc.input_ids) != max_length:  # cut only what does not fit
            return False
        # an older turn is dropped only when it does not fit whole
        return not (older_dropped and not persona_cut and len(enc.input_ids) + len(turns[j - 1]) <= max_length)

    assert any(follows_the_policy(*w) for w in ways), ways


@SETTINGS
@given(persona=persona, context=context, response=response, max_length=st.integers(8, 200),
       reserve=st.integers(0, 220))
def test_encode_prompt_fits_and_matches_training_prefix(tok, persona, context, response, max_length, reserve):
    fmt = DialogueFormatter(tok, max_length=max_length)
    ex = Example(tuple(persona), tuple(context), response)
    try:
        prompt = fmt.encode_prompt(persona, context, reserve=reserve)
    except ResponseTooLong:
        tail = fmt._tokenize_segments(render_segments(persona, context))[-1]
        assert len(fmt.bos) + len(tail) > max_length - reserve  # only when even " R:" does not fit
        return
    assert len(prompt) <= max_length - reserve
    assert _decode(tok, prompt).endswith(" R:")
    full = DialogueFormatter(tok, max_length=10**6).encode(ex)
    if reserve == 0 and len(full.input_ids) <= max_length:
        assert prompt == full.prompt_ids


@SETTINGS
@given(persona=persona, context=context, response=response, n=st.integers(0, 8))
def test_max_context_turns_keeps_only_the_newest(tok, persona, context, response, n):
    ex = Example(tuple(persona), tuple(context), response)
    kept = Example(tuple(persona), tuple(context[len(context) - n:] if n else ()), response)
    assert DialogueFormatter(tok, max_length=10**6, max_context_turns=n).encode(ex) == \
        DialogueFormatter(tok, max_length=10**6).encode(kept)


def test_reserving_everything_is_too_long_not_unlimited(tiny_tokenizer):
    """encode_prompt(reserve=max_length) used to fall back to the full max_length (``0 or max_length``)."""
    fmt = DialogueFormatter(tiny_tokenizer, max_length=40)
    with pytest.raises(ResponseTooLong, match="does not fit in 0 tokens"):
        fmt.encode_prompt(("i like cats.",), ("hi",), reserve=40)
    assert len(fmt.encode_prompt(("i like cats.",), ("hi",), reserve=30)) <= 10
