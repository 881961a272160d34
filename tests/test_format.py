import pytest

from spt.data import Example
from spt.format import IGNORE_INDEX, DialogueFormatter, ResponseTooLong, render_segments, render_text

EX = Example(
    persona=("i like cats.", "i ski."),
    context=("hi , how are you ?", "good , you ?", "great ! do you have pets ?"),
    response="yes , two cats .",
)


def test_template_text_and_roles():
    assert render_text(EX.persona, EX.context, EX.response) == (
        "given persona: i like cats. i ski.; context: Q: hi , how are you ? R: good , you ? "
        "Q: great ! do you have pets ? R: yes , two cats ."
    )
    # An even-length history starts with the responder: roles count back from the partner's last turn.
    assert render_segments(("p.",), ("a", "b"))[1:] == [" R: a", " Q: b", " R:"]


@pytest.mark.parametrize("tok_fixture", ["gpt2_tokenizer", "tiny_tokenizer"])
def test_labels_mask_all_but_response_and_eos(tok_fixture, request):
    tok = request.getfixturevalue(tok_fixture)
    assert tok.pad_token_id == tok.eos_token_id  # the hard case: pad == eos
    enc = DialogueFormatter(tok, max_length=512).encode(EX)
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.input_ids[0] == tok.bos_token_id
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: enc.prompt_len])
    target = enc.labels[enc.prompt_len:]
    assert target == enc.input_ids[enc.prompt_len:]
    assert target[-1] == tok.eos_token_id  # EOS is trained even though it is also the pad id
    assert tok.decode(target[:-1]).strip() == EX.response
    assert tok.decode(enc.prompt_ids, skip_special_tokens=True).endswith("R:")


@pytest.mark.parametrize("tok_fixture", ["gpt2_tokenizer", "tiny_tokenizer"])
def test_inference_input_matches_training_prefix(tok_fixture, request):
    tok = request.getfixturevalue(tok_fixture)
    fmt = DialogueFormatter(tok, max_length=512)
    prompt = fmt.encode_prompt(EX.persona, EX.context)
    assert prompt == fmt.encode(EX).prompt_ids
    assert tok.decode(prompt, skip_special_tokens=True) == render_text(EX.persona, EX.context)


def test_truncation_keeps_response_and_newest_context(gpt2_tokenizer):
    full = DialogueFormatter(gpt2_tokenizer, max_length=512).encode(EX)
    for max_length in (len(full.input_ids) - 3, 30, 20, 14):
        enc = DialogueFormatter(gpt2_tokenizer, max_length=max_length).encode(EX)
        assert len(enc.input_ids) <= max_length
        assert enc.labels[enc.prompt_len:] == full.labels[full.prompt_len:]  # response untouched
        text = gpt2_tokenizer.decode(enc.prompt_ids, skip_special_tokens=True)
        assert text.endswith("do you have pets ? R:")
    enc = DialogueFormatter(gpt2_tokenizer, max_length=len(full.input_ids) - 3).encode(EX)
    text = gpt2_tokenizer.decode(enc.input_ids, skip_special_tokens=True)
    assert "hi , how are you" not in text  # the oldest turn went first
    assert "given persona: i like cats. i ski." in text  # the persona stayed


def test_persona_cut_from_the_left_after_old_turns(gpt2_tokenizer):
    def prompt_text(max_length):
        enc = DialogueFormatter(gpt2_tokenizer, max_length=max_length).encode(EX)
        return gpt2_tokenizer.decode(enc.prompt_ids, skip_special_tokens=True)

    persona = "given persona: i like cats. i ski.; context:"
    assert prompt_text(36) == persona + " R: good , you ? Q: great ! do you have pets ? R:"
    assert prompt_text(30) == persona + " Q: great ! do you have pets ? R:"  # older turns go first
    assert prompt_text(26) == " like cats. i ski.; context: Q: great ! do you have pets ? R:"  # then persona


def test_max_context_turns(gpt2_tokenizer):
    fmt = DialogueFormatter(gpt2_tokenizer, max_length=512, max_context_turns=1)
    text = gpt2_tokenizer.decode(fmt.encode_prompt(EX.persona, EX.context), skip_special_tokens=True)
    assert text == "given persona: i like cats. i ski.; context: Q: great ! do you have pets ? R:"
    fmt0 = DialogueFormatter(gpt2_tokenizer, max_length=512, max_context_turns=0)
    assert gpt2_tokenizer.decode(fmt0.encode_prompt(EX.persona, EX.context), skip_special_tokens=True) == \
        "given persona: i like cats. i ski.; context: R:"


def test_reserve_for_generation(gpt2_tokenizer):
    fmt = DialogueFormatter(gpt2_tokenizer, max_length=40)
    assert len(fmt.encode_prompt(EX.persona, EX.context, reserve=16)) <= 24


def test_response_too_long(gpt2_tokenizer):
    with pytest.raises(ResponseTooLong, match="max_length=8"):
        DialogueFormatter(gpt2_tokenizer, max_length=8).encode(EX)


def test_bad_formatter_arguments(gpt2_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        DialogueFormatter(gpt2_tokenizer, max_length=2)
    with pytest.raises(ValueError, match="max_context_turns"):
        DialogueFormatter(gpt2_tokenizer, max_context_turns=-1)
