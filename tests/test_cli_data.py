import json

from conftest import GPT2_TOKENIZER, PERSONACHAT, shared_path
from spt.cli import main
from spt.data import read_examples


def test_synth_split_stats_convert(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--dialogues", "50", "--seed", "1",
                 "--split", "train=0.8,valid=0.2"]) == 0
    train = read_examples(tmp_path / "train.jsonl")
    valid = read_examples(tmp_path / "valid.jsonl")
    assert len({e.dialogue_id for e in train}) == 40 and len({e.dialogue_id for e in valid}) == 10
    assert all(e.style for e in train)
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path / "synthetic.jsonl")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["dialogues"] == 50 and stats["examples"] == len(train) + len(valid)
    assert stats["unit"] == "words" and stats["response_length"]["p100"] >= stats["response_length"]["p50"]


def test_stats_with_tokenizer_on_personachat(capsys):
    path = shared_path(PERSONACHAT / "valid_self_original_no_cands.txt")
    assert main(["data", "stats", str(path), "--tokenizer", str(shared_path(GPT2_TOKENIZER))]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["dialogues"], stats["examples"], stats["persona_sentences"]) == (1000, 7801, 670)
    assert stats["input_length"]["p50"] > 100 and stats["over_max_length_512"] == 0


def test_split_and_convert(tmp_path):
    path = shared_path(PERSONACHAT / "valid_self_original_no_cands.txt")
    assert main(["data", "split", str(path), "--out", str(tmp_path), "--fractions", "train=0.8,valid=0.2"]) == 0
    assert len({e.dialogue_id for e in read_examples(tmp_path / "train.jsonl")}) == 800
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "all.jsonl")]) == 0
    assert len(read_examples(tmp_path / "all.jsonl")) == 7801


def test_bad_input_exit_code_and_message(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 your persona: a.\n2 no tab\n")
    assert main(["data", "stats", str(bad), "--strict"]) == 2
    assert "bad.txt:2: response turn without a tab" in capsys.readouterr().err


def test_download_offline_fails_fast_with_instructions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPT_CACHE", str(tmp_path))
    monkeypatch.setenv("SPT_OFFLINE", "1")
    assert main(["data", "download", "convai2"]) == 2
    err = capsys.readouterr().err
    assert "no network access" in err and str(tmp_path) in err


def test_split_with_null_dialogue_ids_fills_every_split(tmp_path, capsys):
    """Null dialogue ids used to become the one id "None": one dialogue, so one split got everything."""
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"persona": [f"p{i}."], "context": ["hi"], "response": "x",
                                       "dialogue_id": None}) + "\n" for i in range(10)))
    assert main(["data", "split", str(src), "--out", str(tmp_path / "out"), "--fractions", "train=0.8,valid=0.2"]) == 0
    assert len(read_examples(tmp_path / "out" / "train.jsonl")) == 8
    assert len(read_examples(tmp_path / "out" / "valid.jsonl")) == 2
    assert "valid: 2 examples, 2 dialogues" in capsys.readouterr().out


def test_split_names_must_stay_inside_out(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"persona": ["p."], "response": "x"}) + "\n")
    assert main(["data", "split", str(src), "--out", str(tmp_path / "a" / "b"),
                 "--fractions", "../../escape=0.5,train=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad split name '../../escape'" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.jsonl"]


def test_convert_to_existing_folder_is_one_line_and_leaves_no_temp(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"persona": ["p."], "response": "x"}) + "\n")
    (tmp_path / "out").mkdir()
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.jsonl", "out"]
