import json

import pytest

from conftest import PERSONACHAT, SPC_CSV, shared_path
from spt.data import DataError, ReadReport, detect_format, read_examples, write_jsonl


@pytest.mark.parametrize("name", ["valid_self_original_no_cands.txt", "valid_self_revised_no_cands.txt",
                                  "valid_both_original_no_cands.txt"])
def test_personachat_validation_counts(name):
    examples = read_examples(shared_path(PERSONACHAT / name))
    assert len(examples) == 7801
    assert len({e.dialogue_id for e in examples}) == 1000
    first = examples[0]
    assert len(first.persona) == 4
    assert first.context == ("hello what are doing today ?",)
    assert first.response == "i am good , i just got off work and tired , i have two jobs ."
    second = examples[1]
    assert second.context == (first.context[0], first.response, "i just got done watching a horror movie")


def test_personachat_self_original_first_example():
    first = read_examples(shared_path(PERSONACHAT / "valid_self_original_no_cands.txt"))[0]
    assert first.persona[0] == "i read twenty books a year."
    assert first.persona[-1] == "i was raised in a single parent household."
    assert first.partner_persona == ()


def test_revised_personas_differ_but_dialogues_match():
    orig = read_examples(shared_path(PERSONACHAT / "valid_self_original_no_cands.txt"))
    rev = read_examples(shared_path(PERSONACHAT / "valid_self_revised_no_cands.txt"))
    assert rev[0].persona[0].startswith("i've been know to finish almost two dozen novels")
    assert [e.response for e in orig] == [e.response for e in rev]


def test_both_file_has_partner_persona():
    first = read_examples(shared_path(PERSONACHAT / "valid_both_original_no_cands.txt"))[0]
    assert first.persona[0] == "i read twenty books a year."
    assert first.partner_persona[0] == "horror movies are my favorites."
    assert len(first.partner_persona) == 5


# The first dialogue of ConvAI2's *train* file, as the issue describes it (the shared copy holds only
# the validation files): the reader must yield the known first example from it.
TRAIN_HEAD = (
    "1 your persona: i like to remodel homes.\n2 your persona: i like to go hunting.\n"
    "3 your persona: i like to shoot a bow.\n4 your persona: my favorite holiday is halloween.\n"
    "5 hi , how are you doing ? i'm getting ready to do some cheetah chasing to stay in shape .\t"
    "you must be very fast . hunting is one of my favorite hobbies .\n"
    "6 i am ! for my hobby i like to do canning or some whittling .\ti also remodel homes when i am not out "
    "bow hunting .\n"
)


def test_train_file_first_example(tmp_path):
    path = tmp_path / "train_self_original_no_cands.txt"
    path.write_text(TRAIN_HEAD)
    examples = read_examples(path)
    assert len(examples) == 2
    assert examples[0].persona[0] == "i like to remodel homes." and len(examples[0].persona) == 4
    assert examples[0].response == "you must be very fast . hunting is one of my favorite hobbies ."


def test_with_cands_variant(tmp_path):
    path = tmp_path / "valid_self_original.txt"
    path.write_text("1 your persona: i like cats.\n2 hi there\thello !\t\tbye|nope|hello !\n"
                    "3 how are you ?\tfine .\t\ta|b|fine .\n1 your persona: i ski.\n2 yo\they .\t\tx|hey .\n")
    examples = read_examples(path)
    assert [e.response for e in examples] == ["hello !", "fine .", "hey ."]
    assert examples[1].context == ("hi there", "hello !", "how are you ?")
    assert len({e.dialogue_id for e in examples}) == 2


def test_synthetic_persona_chat_csv():
    examples = read_examples(shared_path(SPC_CSV))
    assert len({e.dialogue_id for e in examples}) == 1000
    first = examples[0]
    assert first.context == ("Hi!",) and first.response == "Hello!"
    assert first.persona[0] == "I am a boy."  # User 2 answers User 1's opening
    assert examples[1].persona[0] == "I love to bake cookies."  # then User 1 is the responder


def test_hf_json(tmp_path):
    path = tmp_path / "personachat_self_original.json"
    path.write_text(json.dumps({
        "train": [{"personality": ["i like cats."], "utterances": [
            {"history": ["hi"], "candidates": ["wrong", "hello !"]},
            {"history": ["hi", "hello !", "cats ?"], "candidates": ["no", "yes i love cats ."]}]}],
        "valid": [{"personality": ["i ski."], "utterances": [{"history": ["yo"], "candidates": ["hey ."]}]}],
    }))
    examples = read_examples(path)
    assert [e.response for e in examples] == ["hello !", "yes i love cats .", "hey ."]
    assert examples[1].context == ("hi", "hello !", "cats ?")
    assert len({e.dialogue_id for e in examples}) == 2


def test_jsonl_round_trip(tmp_path):
    examples = read_examples(shared_path(PERSONACHAT / "valid_both_original_no_cands.txt"))[:50]
    write_jsonl(examples, tmp_path / "x.jsonl")
    back = read_examples(tmp_path / "x.jsonl")
    assert [(e.persona, e.context, e.response, e.dialogue_id, e.partner_persona) for e in back] == \
           [(e.persona, e.context, e.response, e.dialogue_id, e.partner_persona) for e in examples]


def test_detect_format(tmp_path):
    (tmp_path / "a.data").write_text("1 your persona: x.\n2 hi\tho\n")
    (tmp_path / "b.data").write_text('{"persona": ["x."], "context": [], "response": "y"}\n')
    (tmp_path / "c.data").write_text("hello world\n")
    assert detect_format(tmp_path / "a.data") == "parlai"
    assert detect_format(tmp_path / "b.data") == "jsonl"
    with pytest.raises(DataError, match=r"c\.data: unknown data format"):
        detect_format(tmp_path / "c.data")
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        read_examples(tmp_path / "a.data", "xml")


# --- bad input --------------------------------------------------------------------------------

def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


def test_parlai_missing_tab_strict_names_line(tmp_path):
    p = _write(tmp_path, "d.txt", "1 your persona: i like cats.\n2 hi\thello\n3 no tab here\n")
    with pytest.raises(DataError, match=r"d\.txt:3: response turn without a tab"):
        read_examples(p, strict=True)


def test_parlai_bad_dialogue_is_skipped_and_counted(tmp_path):
    p = _write(tmp_path, "d.txt", "1 your persona: a.\n2 hi\thello\n1 your persona: b.\n2 no tab\n"
                                  "1 your persona: c.\n2 yo\they\n")
    report = ReadReport()
    examples = read_examples(p, report=report)
    assert [e.persona for e in examples] == [("a.",), ("c.",)]
    assert report.skipped == 1 and "d.txt:4" in report.reasons[0]


@pytest.mark.parametrize("text, problem", [
    ("2 hi\thello\n", "empty persona"),
    ("1 your persona: a.\nhi\thello\n", "does not start with a turn number"),
    ("1 your persona: a.\n2 hi\thello\n3 your persona: b.\n", "persona line after the dialogue started"),
    ("1 your persona: a.\n2 hi\t \n", "empty response"),
])
def test_parlai_bad_input(tmp_path, text, problem):
    p = _write(tmp_path, "d.txt", text)
    with pytest.raises(DataError, match=problem):
        read_examples(p, strict=True)


def test_not_utf8_names_line(tmp_path):
    p = _write(tmp_path, "d.txt", b"1 your persona: a.\n2 caf\xe9\thello\n")
    with pytest.raises(DataError, match=r"d\.txt:2: not UTF-8"):
        read_examples(p)
    p = _write(tmp_path, "d.jsonl", b'{"persona": ["a."], "context": [], "response": "b"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8"):
        read_examples(p)


@pytest.mark.parametrize("line, problem", [
    ('{"persona": [], "context": [], "response": "x"}', "field 'persona': empty persona"),
    ('{"persona": ["a."], "context": []}', "field 'response'"),
    ('{"persona": ["a."], "context": "hi", "response": "x"}', "field 'context': expected a list"),
    ('{"persona": ["a."], "response": "x"', "invalid JSON"),
    ('["a"]', "expected a JSON object"),
])
def test_jsonl_bad_input(tmp_path, line, problem):
    p = _write(tmp_path, "d.jsonl", '{"persona": ["a."], "context": ["hi"], "response": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{problem}"):
        read_examples(p, strict=True)
    report = ReadReport()
    assert len(read_examples(p, report=report)) == 1 and report.skipped == 1


def test_json_bad_input(tmp_path):
    p = _write(tmp_path, "d.json", '{"train": [{"personality": ["a."], "utterances": [{"history": []}]}]}')
    with pytest.raises(DataError, match=r"train\[0\]\.utterances\[0\]\.candidates"):
        read_examples(p, strict=True)
    p = _write(tmp_path, "e.json", '{"train": [')
    with pytest.raises(DataError, match=r"e\.json:1: invalid JSON"):
        read_examples(p)
    p = _write(tmp_path, "f.json", '{"train": [{"personality": [], "utterances": []}]}')
    with pytest.raises(DataError, match="personality: expected a non-empty list"):
        read_examples(p, strict=True)


def test_spc_bad_input(tmp_path):
    p = _write(tmp_path, "d.csv", "user 1 personas,conversation\nx,y\n")
    with pytest.raises(DataError, match=r"d\.csv:1: not a Synthetic-Persona-Chat CSV"):
        read_examples(p)
    p = _write(tmp_path, "e.csv", 'user 1 personas,user 2 personas,conv\n"a.",,"User 1: hi\nUser 2: yo"\n')
    with pytest.raises(DataError, match=r"e\.csv:3: empty persona"):
        read_examples(p, strict=True)
    p = _write(tmp_path, "f.csv", 'user 1 personas,user 2 personas,conv\n"a.","b.","User 1: hi\n* * *\nUser 2: yo"\n')
    with pytest.raises(DataError, match="conversation line 2 has no 'User 1:'"):
        read_examples(p, strict=True)
    report = ReadReport()
    assert [e.response for e in read_examples(p, report=report)] == ["yo"] and report.skipped == 1


def test_empty_file_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no examples found"):
        read_examples(_write(tmp_path, "d.jsonl", "\n"))
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "missing.txt")


# --- issue 4/5: BOM, unnumbered ParlAI lines, null JSONL fields -------------------------------

@pytest.mark.parametrize("name, text", [
    ("d.txt", "1 your persona: i like cats.\n2 your persona: i ski.\n3 hi\thello\n"),
    ("d.jsonl", '{"persona": ["i like cats.", "i ski."], "context": ["hi"], "response": "hello"}\n'),
    ("d.json", '{"train": [{"personality": ["i like cats.", "i ski."], '
               '"utterances": [{"history": ["hi"], "candidates": ["hello"]}]}]}'),
    ("d.csv", 'user 1 personas,user 2 personas,conv\n"x.","i like cats.\ni ski.","User 1: hi\nUser 2: hello"\n'),
])
def test_utf8_bom_is_ignored_by_every_reader(tmp_path, name, text):
    plain = read_examples(_write(tmp_path, name, text.encode()))
    report = ReadReport()
    bom = read_examples(_write(tmp_path, "bom-" + name, b"\xef\xbb\xbf" + text.encode()), report=report)
    assert report.skipped == 0
    assert [(e.persona, e.context, e.response) for e in bom] == [(e.persona, e.context, e.response) for e in plain]
    assert bom[0].persona == ("i like cats.", "i ski.")


def test_parlai_unnumbered_line_drops_its_whole_dialogue(tmp_path, caplog):
    p = _write(tmp_path, "d.txt", "1 your persona: a.\n2 hi\thello\nstray\n3 how are you\tfine\n"
                                  "1 your persona: b.\n2 yo\they\n3 ok ?\tok .\n")
    report = ReadReport()
    examples = read_examples(p, report=report)
    assert [e.persona for e in examples] == [("b.",), ("b.",)]  # no example of the dialogue with the hole
    assert examples[1].context == ("yo", "hey", "ok ?")
    assert report.skipped == 1 and "d.txt:3: line does not start with a turn number; dropped its whole dialogue " \
                                   "(lines 1-4)" in report.reasons[0]
    assert "d.txt:3: line does not start with a turn number" in caplog.text  # the warning names file:line
    with pytest.raises(DataError, match=r"d\.txt:3: line does not start with a turn number"):
        read_examples(p, strict=True)


def test_jsonl_null_dialogue_id_never_merges_dialogues(tmp_path):
    rows = [{"persona": [f"p{i}."], "context": ["hi"], "response": "x", "dialogue_id": None} for i in range(3)]
    rows.append({"persona": ["q."], "context": ["hi"], "response": "y", "dialogue_id": "kept", "turn": None})
    p = _write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    examples = read_examples(p)
    assert [e.dialogue_id for e in examples] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3", "kept"]
    assert examples[3].turn == 0


@pytest.mark.parametrize("value, shown", [('"abc"', '"abc"'), ("-2", "-2"), ("1.5", "1.5"), ("true", "true")])
def test_jsonl_bad_turn_is_a_counted_skip_naming_line_and_field(tmp_path, value, shown):
    p = _write(tmp_path, "d.jsonl", '{"persona": ["a."], "response": "ok"}\n'
                                    f'{{"persona": ["a."], "response": "ok", "turn": {value}}}\n')
    report = ReadReport()
    assert len(read_examples(p, report=report)) == 1
    assert report.skipped == 1 and report.reasons[0].endswith(
        f"d.jsonl:2: field 'turn': expected a non-negative integer, found {shown}")
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'turn'"):
        read_examples(p, strict=True)
