"""spt serve: the OpenAI-compatible endpoint, dynamic batching, streaming, limits and bad input, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

import spt
from spt.cli import main
from spt.config import ConfigError, ServeConfig, load_config
from spt.serve import create_app, split_sentences

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
GEN = {"generate.stop": [], "generate.max_new_tokens": 6}  # no stop strings: a random tiny LM's reply is not cut
PERSONA = ["i like cats.", "i have two dogs."]
HISTORY = ["hi ! any pets ?"]


def _train(tiny_lm_dir, synth_dir, out, *extra) -> Path:
    assert main(["train", "--config", TINY, "--output-dir", str(out), "--no-progress",
                 f"--model.name_or_path={tiny_lm_dir}", f"--data.train={synth_dir / 'train.jsonl'}",
                 f"--data.valid={synth_dir / 'valid.jsonl'}", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def bot(tiny_lm_dir, synth_dir, tmp_path_factory):
    run = _train(tiny_lm_dir, synth_dir, tmp_path_factory.mktemp("serve") / "spt")
    return spt.load(run, "cpu", GEN)


@pytest.fixture(scope="module")
def textual_bot(tiny_lm_dir, synth_dir, tmp_path_factory):
    run = _train(tiny_lm_dir, synth_dir, tmp_path_factory.mktemp("serve") / "textual", "--method=textual")
    return spt.load(run, "cpu", GEN)


def _app(bot, **limits):
    return create_app(bot, "tiny", dataclasses.replace(bot.config.serve, **limits))


def _body(persona=PERSONA, history=HISTORY, **extra) -> dict:
    messages = [{"role": "system", "content": " ".join(persona)}]
    messages += [{"role": "user" if (len(history) - i) % 2 else "assistant", "content": t}
                 for i, t in enumerate(history)]
    return {"model": "tiny", "messages": messages, **extra}


def _dialogues(n: int) -> list[tuple[list[str], list[str]]]:
    from spt.data.synth import synth_examples

    return [(list(e.persona), list(e.context)) for e in synth_examples(12, seed=3)[:n]]


def test_spt_reply_is_the_responders_reply(bot):
    expected = bot.respond(PERSONA, HISTORY)
    with TestClient(_app(bot)) as client:
        r = client.post("/v1/chat/completions", json=_body())
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "chat.completion" and out["model"] == "tiny" and out["id"].startswith("chatcmpl-")
        assert abs(out["created"] - time.time()) < 60
        choice = out["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": expected.text}
        assert expected.text and choice["finish_reason"] in ("stop", "length")
        assert out["spt"]["prompt"] == expected.prompt in (0, 1) and out["spt"]["scores"] == expected.scores
        assert out["spt"]["persona"] == PERSONA and out["spt"]["truncated"] is False
        prompt_tokens = len(bot.input_ids(PERSONA, HISTORY, 6))
        completion = len(bot.method.tokenizer(expected.raw, add_special_tokens=False)["input_ids"])
        assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                "total_tokens": prompt_tokens + completion}
        # the persona field instead of a system message, content as a list of text parts: the same reply
        alt = {"model": "tiny", "persona": PERSONA,
               "messages": [{"role": "user", "content": [{"type": "text", "text": HISTORY[0]}]}]}
        assert client.post("/v1/chat/completions", json=alt).json()["choices"][0]["message"]["content"] == \
            expected.text
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["generate_calls"] == 2 and health["requests"] == 2
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/docs").status_code == 200
        assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_textual_method_reply(textual_bot):
    expected = textual_bot.respond(PERSONA, HISTORY)
    with TestClient(_app(textual_bot)) as client:
        out = client.post("/v1/chat/completions", json=_body()).json()
    assert out["choices"][0]["message"]["content"] == expected.text
    assert out["spt"]["prompt"] is None and out["spt"]["scores"] == []


def test_system_message_split_into_sentences():
    assert split_sentences("Your persona: i like cats. I have two dogs!\nmy job is boring") == \
        ["i like cats.", "I have two dogs!", "my job is boring"]
    assert split_sentences("a. | b.") == ["a.", "b."]
    from spt.serve import ChatRequest, dialogue

    req = ChatRequest(messages=[{"role": "system", "content": "i like cats\ni have  two dogs"},
                                {"role": "user", "content": "hi  there"}])
    assert dialogue(req) == (["i like cats", "i have two dogs"], ["hi there"])  # line breaks split the persona


async def _many(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))


def test_32_concurrent_requests_share_generate_calls(bot):
    dialogues = (_dialogues(12) * 3)[:32]
    bodies = [_body(p, h, max_tokens=4 if i % 2 else 6) for i, (p, h) in enumerate(dialogues)]
    app = _app(bot, max_batch=32, batch_window_ms=200)
    responses = asyncio.run(_many(app, bodies))
    assert [r.status_code for r in responses] == [200] * 32
    counters = app.state.batcher.counters
    # two generation settings (max_tokens 4 and 6): at least two calls, far fewer than 32
    assert 2 <= counters.generate_calls < 32 and counters.max_rows_in_a_call > 1 and counters.rows == 32
    # each row of a batch gets its own prompt and the reply it gets alone
    for (persona, history), body, r in zip(dialogues, bodies, responses, strict=True):
        alone = bot.respond(persona, history, max_new_tokens=body["max_tokens"])
        out = r.json()
        assert out["choices"][0]["message"]["content"] == alone.text
        assert out["spt"]["prompt"] == alone.prompt and out["spt"]["scores"] == alone.scores
    assert len({r.json()["spt"]["prompt"] for r in responses}) >= 1

    off = _app(bot, max_batch=1)  # batching off: one call per request
    assert all(r.status_code == 200 for r in asyncio.run(_many(off, bodies[:8])))
    assert off.state.batcher.counters.generate_calls == 8


def _sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_chunks_concatenate_to_the_reply(bot):
    with TestClient(_app(bot)) as client:
        whole = client.post("/v1/chat/completions", json=_body()).json()
        r = client.post("/v1/chat/completions", json=_body(stream=True, stream_options={"include_usage": True}))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse_events(r.text)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"] != ""
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert finals[0]["spt"]["prompt"] == whole["spt"]["prompt"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_n_samples_rows(bot):
    with TestClient(_app(bot)) as client:
        out = client.post("/v1/chat/completions", json=_body(n=3, temperature=1.0, seed=7)).json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert len({c["message"]["content"] for c in out["choices"]}) > 1  # sampled rows differ
        assert client.get("/health").json()["rows"] == 3


BAD = [  # (raw body or JSON, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"", 400, None),
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}], "persona": PERSONA}, 400, "messages[0].content"),
    ({"messages": [{"role": "user"}], "persona": PERSONA}, 400, "messages[0].content"),
    ({"persona": PERSONA, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     400, "messages[1].role"),  # the last message is the assistant's
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),  # no persona
    ({"messages": [{"role": "user", "content": "hi"}], "persona": "i like cats."}, 400, "persona"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": [" "]}, 400, "persona"),
    (_body(history=["  "]), 400, "messages[1].content"),
    (_body(model="gpt-4"), 404, "model"),
    (_body(max_tokens=100000), 400, "max_tokens"),
    (_body(max_completion_tokens=100000), 400, "max_completion_tokens"),
    (_body(max_tokens="5"), 400, "max_tokens"),
    (_body(max_tokens=0), 400, "max_tokens"),
    (_body(temperature=5), 400, "temperature"),
    (_body(top_p=0), 400, "top_p"),
    (_body(n=2), 400, "n"),  # greedy: n identical replies
    (_body(n=100, temperature=1.0), 400, "n"),
    (_body(stream="yes"), 400, "stream"),
    (_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (b'{"messages": [' + b'{"role": "user", "content": "' + b"x" * 5000 + b'"}]}', 413, None),
]


def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(bot):
    with TestClient(_app(bot, max_body_bytes=4000, max_new_tokens=16)) as client:
        for body, status, param in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"content": json.dumps(body)}
            r = client.post("/v1/chat/completions", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["param"] == param, (body, err)
            assert err["type"] == "invalid_request_error"
            ok = client.post("/v1/chat/completions", json=_body())
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        health = client.get("/health").json()
        assert health["rejected"] == len(BAD) and health["requests"] == len(BAD)
        assert client.get("/nowhere").json()["error"]["message"]  # unknown routes: OpenAI-style too


def test_long_inputs_are_truncated_as_in_training_or_refused(bot):
    history = ["hello there ! " * 20, "hi , how are you ?", "fine . do you have pets ? i have many of them"]
    with TestClient(_app(bot, max_input_tokens=40)) as client:
        out = client.post("/v1/chat/completions", json=_body(history=history)).json()
    assert out["spt"]["truncated"] is True and out["usage"]["prompt_tokens"] == 40
    expected = bot.respond_many([(PERSONA, history)], max_input_tokens=40)[0]
    assert out["choices"][0]["message"]["content"] == expected.text
    ids = bot.input_ids(PERSONA, history, 6, 40)
    assert len(ids) == 40 and bot.method.tokenizer.decode(ids).endswith("many of them R:")
    with TestClient(_app(bot, max_input_tokens=40, reject_long_inputs=True)) as client:
        r = client.post("/v1/chat/completions", json=_body(history=history))
        assert r.status_code == 413 and r.json()["error"]["param"] == "messages"
        assert client.post("/v1/chat/completions", json=_body()).status_code == 200  # a short one still passes


def _slow(bot, monkeypatch, seconds: float):
    real = bot.respond_many

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    monkeypatch.setattr(bot, "respond_many", slow)


def test_full_queue_429_and_timeout_504(bot, monkeypatch):
    _slow(bot, monkeypatch, 0.5)
    rs = asyncio.run(_many(_app(bot, max_queue=2, batch_window_ms=0, max_batch=1), [_body()] * 4))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429]
    assert next(r for r in rs if r.status_code == 429).json()["error"]["type"] == "rate_limit_error"
    r = asyncio.run(_many(_app(bot, request_timeout_s=0.1), [_body()]))[0]
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_model_error_fails_its_batch_only(bot, monkeypatch):
    real, calls = bot.respond_many, []

    def broken_once(*a, **k):
        calls.append(len(a[0]))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(*a, **k)

    monkeypatch.setattr(bot, "respond_many", broken_once)
    app = _app(bot, batch_window_ms=300)
    first = asyncio.run(_many(app, [_body(p, h) for p, h in _dialogues(4)]))
    assert calls == [4] and [r.status_code for r in first] == [500] * 4  # one batch of 4: all four fail
    err = first[0].json()["error"]
    assert err["type"] == "server_error" and "RuntimeError" in err["message"] and "CUDA" not in err["message"]
    again = asyncio.run(_many(app, [_body()]))[0]
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == \
        bot.respond(PERSONA, HISTORY).text
    assert app.state.batcher.counters.failed_batches == 1


def test_serve_config_section_is_validated():
    assert load_config(None, {"serve.max_batch": 4}).serve.max_batch == 4
    for key, value in [("serve.max_batch", 0), ("serve.batch_window_ms", -1), ("serve.max_input_tokens", 3),
                       ("serve.request_timeout_s", float("nan"))]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, {key: value})
    assert ServeConfig().reject_long_inputs is False


def test_openai_client_against_uvicorn(bot):
    openai = pytest.importorskip("openai")
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(bot), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        expected = bot.respond(PERSONA, HISTORY)
        out = client.chat.completions.create(model="tiny", max_tokens=6, messages=[
            {"role": "system", "content": " ".join(PERSONA)}, {"role": "user", "content": HISTORY[0]}])
        assert out.choices[0].message.content == expected.text and out.usage.total_tokens > 0
        assert out.model_extra["spt"]["prompt"] == expected.prompt
        stream = client.chat.completions.create(model="tiny", max_tokens=6, stream=True,
                                                extra_body={"persona": PERSONA},
                                                messages=[{"role": "user", "content": HISTORY[0]}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny", max_tokens=10**6, extra_body={"persona": PERSONA},
                                           messages=[{"role": "user", "content": "hi"}])
    finally:
        server.should_exit = True
        thread.join(10)
