"""spt chat: the loop fed through streams (every command, persona, retry, save), and the CLI with piped stdin."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import pytest

import spt
from conftest import tiny_train_args
from spt.chat import Chat, ChatSession, chat, format_selection, split_persona
from spt.cli import main
from spt.data import read_examples

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
GEN = {"generate.stop": [], "generate.max_new_tokens": 5}  # no stop strings: a random tiny LM's reply is not cut
PERSONA = ["i like cats.", "i have two dogs."]
SELECTION = re.compile(r"\[prompt (\d) \| (\d\.\d\d) (\d\.\d\d)\]$")


@pytest.fixture(scope="module")
def run(tiny_lm_dir, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "spt"
    assert main(tiny_train_args(tiny_lm_dir, synth_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def bot(run):
    return spt.load(run, "cpu", GEN)


def _chat(bot, lines: list[str], persona=PERSONA, **kw) -> tuple[ChatSession, list[str]]:
    out = io.StringIO()
    session = chat(bot, persona, io.StringIO("".join(f"{line}\n" for line in lines)), out, **kw)
    return session, out.getvalue().splitlines()


def _bot_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("bot: ")]


def test_every_command_persona_retry_and_save(bot, tmp_path):
    save = tmp_path / "dialogue.jsonl"
    session, lines = _chat(bot, [
        "hi ! do you have pets ?",
        "/persona",
        "what do you do ?",
        "/retry",
        "/help",
        "/nope",
        f"/save {save}",
        "/persona i am a pilot. | i have a cat.",
        "where do you fly ?",
        "/reset",
        "hello",
        "/save",
        "/exit",
        "this line is never read",
    ])
    assert lines[0] == "persona: i like cats. | i have two dogs."  # shown at the start
    assert lines[1] == "bot: " + _reply_line(bot, PERSONA, ["hi ! do you have pets ?"])
    assert lines[2] == lines[0]  # /persona shows it
    first = bot.respond(PERSONA, ["hi ! do you have pets ?"]).text
    second = bot.respond(PERSONA, ["hi ! do you have pets ?", first, "what do you do ?"], seed=1)
    assert lines[3] == "bot: " + f"{second.text}  {format_selection(second)}"
    retried = bot.respond(PERSONA, ["hi ! do you have pets ?", first, "what do you do ?"], seed=2, do_sample=True)
    assert lines[4] == "bot: " + f"{retried.text}  {format_selection(retried)}"  # sampled, seed of the 3rd call
    assert retried.text != second.text
    assert "/retry" in "\n".join(lines) and any("/save FILE" in line for line in lines)  # /help
    assert any(line == "error: unknown command /nope; /help lists the commands" for line in lines)
    assert any(line == f"saved 2 example(s) to {save}" for line in lines)
    assert "persona set; history reset" in lines and "persona: i am a pilot. | i have a cat." in lines
    assert "history reset" in lines and "error: /save needs a file name: /save FILE" in lines
    assert "this line is never read" not in "\n".join(lines)
    for line in _bot_lines(lines):
        m = SELECTION.search(line)
        assert m and int(m.group(1)) in (0, 1)  # [prompt k | s0 s1] after every reply
    # after /persona set and /reset: the new persona, and only the turn after the reset
    assert session.persona == ["i am a pilot.", "i have a cat."] and [t.user for t in session.turns] == ["hello"]
    assert session.turns[0].bot.text == bot.respond(session.persona, ["hello"], seed=4).text

    saved = read_examples(save)  # spt JSONL: one example per bot turn, the retried reply replacing the first
    assert [(e.persona, e.context, e.response) for e in saved] == [
        (tuple(PERSONA), ("hi ! do you have pets ?",), first),
        (tuple(PERSONA), ("hi ! do you have pets ?", first, "what do you do ?"), retried.text)]
    assert len({e.dialogue_id for e in saved}) == 1 and saved[0].dialogue_id.startswith("chat-")
    assert main(["data", "stats", str(save)]) == 0


def _reply_line(bot, persona, history, **kw) -> str:
    r = bot.respond(persona, history, **kw)
    return f"{r.text}  {format_selection(r)}"


def test_history_is_truncated_by_the_training_formatter(run, monkeypatch):
    """The whole history goes to generation; the run's formatter cuts it (here data.max_context_turns=1)."""
    bot = spt.load(run, "cpu", {**GEN, "data.max_context_turns": 1})
    seen = []
    real = bot.method.generate
    monkeypatch.setattr(bot.method, "generate", lambda ex, *a, **k: seen.append(ex[0]) or real(ex, *a, **k))
    session, _ = _chat(bot, ["first message", "second message"])
    first = session.turns[0].bot.text
    assert seen[1].context == ("first message", first, "second message")
    fmt = bot.method.formatter()
    assert fmt.encode_prompt(seen[1].persona, seen[1].context, 5) == fmt.encode_prompt(PERSONA, ["second message"], 5)
    assert session.turns[1].bot.text == bot.respond(PERSONA, ["second message"], seed=1).text


def test_piped_mode_is_plain_and_a_terminal_gets_colour(bot):
    _, plain = _chat(bot, ["hi"])
    assert not any("\033" in line for line in plain) and not any("you>" in line for line in plain)
    _, coloured = _chat(bot, ["hi"], interactive=True)
    assert any("\033[" in line for line in coloured) and any("/help" in line for line in coloured)


def test_ctrl_c_and_ctrl_d_end_cleanly(bot):
    class Interrupting(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    out = io.StringIO()
    session = ChatSession(bot, PERSONA)
    assert Chat(session, Interrupting(), out).run() == 0
    assert out.getvalue().startswith("persona: ")
    session, lines = _chat(bot, ["hi"])  # end of input after one message (Ctrl-D)
    assert len(session.turns) == 1 and len(_bot_lines(lines)) == 1


def test_errors_are_reported_and_the_chat_goes_on(bot, tmp_path):
    _, lines = _chat(bot, ["/retry", f"/save {tmp_path / 'x.jsonl'}", "/persona |", f"/save {tmp_path}", "hi",
                           f"/save {tmp_path}"])
    assert "error: nothing to retry yet" in lines
    assert "error: nothing to save yet (no non-empty reply)" in lines
    assert "error: give the persona as sentences separated by |" in lines
    assert any(line.startswith("error: cannot write") for line in lines)  # a folder, not a file
    assert len(_bot_lines(lines)) == 1
    assert split_persona(" a. | | b. ") == ["a.", "b."]


def test_cli_with_piped_stdin(run, synth_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi ! any pets ?\n/persona\n"))
    assert main(["chat", str(run), "--persona", "i like cats.", "--persona", "i ski.", "--generate.stop=[]",
                 "--generate.max_new_tokens=5", "--generate.num_beams=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == lines[2] == "persona: i like cats. | i ski."
    expected = spt.load(run, "cpu", GEN).respond(["i like cats.", "i ski."], ["hi ! any pets ?"], num_beams=2)
    assert lines[1] == f"bot: {expected.text}  {format_selection(expected)}"

    pfile = tmp_path / "persona.txt"
    pfile.write_text("i am a pilot.\n\ni fly planes.\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(run), "--persona-file", str(pfile), "--generate.max_new_tokens=3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "persona: i am a pilot. | i fly planes."

    data = synth_dir / "valid.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", str(run), "--random-persona", str(data), "--seed", "3"]) == 0
    persona = random.Random(3).choice(read_examples(data)).persona
    assert capsys.readouterr().out.splitlines()[0] == "persona: " + " | ".join(persona)


@pytest.mark.parametrize("args, message", [
    ([], "no persona"),
    (["--persona", "a.", "--random-persona", "x.jsonl"], "cannot be combined"),
    (["--persona", "a.", "--train.lr=1"], "only --generate.* and --model.name_or_path"),
    (["--persona", "a.", "--generate.num_beams=0"], "generate.num_beams must be > 0"),
])
def test_cli_errors_are_one_line(run, args, message, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", str(run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("spt: error: ") and message in err
