"""``spt serve RUN``: an OpenAI-compatible HTTP endpoint (FastAPI + uvicorn) with dynamic batching.

    POST /v1/chat/completions   messages -> a reply in the persona's voice (OpenAI chat.completion format)
    GET  /health                status, counters (generate calls, requests, rows) and the batching limits
    GET  /v1/models             the one served model
    GET  /docs                  OpenAPI docs

Persona: the request's ``persona`` field (a list of sentences) or, without it, its ``system`` (or
``developer``) messages split into sentences. ``user`` messages are the partner's turns, ``assistant`` ones the
bot's; consecutive messages of one role are joined into one turn; the last message must be the user's.

Batching: requests wait up to ``serve.batch_window_ms`` for others with the same generation settings (the
GenerateConfig fields) and run together, up to ``serve.max_batch`` rows, as ONE generate call in which each
row carries its own selected soft prompt (:meth:`spt.api.Responder.respond_many`). Generation runs in one
worker thread, so the event loop keeps accepting requests meanwhile.

Decoding: greedy (or the run's ``generate`` settings) unless the request sets ``temperature`` > 0 or
``top_p`` < 1, which turn sampling on. ``n`` > 1 samples n rows; it is refused (400) under greedy decoding,
which would give n identical replies. Sampling without ``seed`` draws a fresh seed per batch.

Streaming (``stream: true``) sends server-sent ``chat.completion.chunk`` events ending with ``data: [DONE]``,
but the whole reply arrives in one content chunk after generation: token-by-token streaming would take each
request out of its shared batch.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Reply, Responder
from .config import GenerateConfig, ServeConfig

log = logging.getLogger(__name__)


# --- errors ---------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str | None = None) -> JSONResponse:
    type_ = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _param(loc: tuple) -> str | None:
    """Pydantic's ("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


# --- request and response models -------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The OpenAI chat request fields spt uses (others are accepted and ignored), plus ``persona``."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None  # the served model's name (GET /v1/models); optional
    persona: list[str] | None = Field(None, description="the persona's sentences (instead of a system message)")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


# --- turning a request into work --------------------------------------------------------------------

_PERSONA_PREFIX = re.compile(r"^\s*(?:your\s+)?persona\s*:\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """A system message as persona sentences: split at line breaks, "|" and sentence ends (. ! ? then
    a space); a leading "persona:" or "your persona:" is dropped."""
    out = []
    for line in re.split(r"[\r\n|]+", text):
        line = _PERSONA_PREFIX.sub("", line)
        out += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return out


def _content(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return " ".join(part.text for part in message.content)


def dialogue(req: ChatRequest) -> tuple[list[str], list[str]]:
    """(persona, history) from the messages; APIError (400) naming the field when they do not make one."""
    if req.messages[-1].role != "user":
        raise APIError(400, f"the last message must be from the user, got {req.messages[-1].role!r}",
                       f"messages[{len(req.messages) - 1}].role")
    history: list[str] = []
    last_role = None
    system: list[str] = []
    for msg in req.messages:
        if msg.role in ("system", "developer"):  # split before spaces are normalised: line breaks separate too
            system += [" ".join(s.split()) for s in split_sentences(_content(msg))]
            continue
        text = " ".join(_content(msg).split())
        if msg.role == last_role:
            history[-1] = f"{history[-1]} {text}".strip()
        else:
            history.append(text)
        last_role = msg.role
    if not history[-1]:
        raise APIError(400, "the last user message is empty", f"messages[{len(req.messages) - 1}].content")
    if req.persona is not None:
        persona = [" ".join(s.split()) for s in req.persona if s.strip()]
        if not persona:
            raise APIError(400, "persona must hold at least one non-empty sentence", "persona")
    else:
        persona = system
        if not persona:
            raise APIError(400, "no persona: give a system message with the persona's sentences, or a 'persona' "
                                "field (a list of sentences)", "messages")
    return persona, history


def batch_key(gen: GenerateConfig) -> tuple:
    """Requests with equal keys can share one generate call: every GenerateConfig field but batch_size."""
    return tuple((f.name, tuple(v) if isinstance(v := getattr(gen, f.name), list) else v)
                 for f in dataclasses.fields(gen) if f.name != "batch_size")


# --- the batcher ------------------------------------------------------------------------------------

@dataclass
class Job:
    key: tuple
    gen: GenerateConfig
    rows: list[tuple[list[str], list[str]]]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # timed out before it ran: skipped


@dataclass
class Counters:
    generate_calls: int = 0  # one per batch: ONE generate call, each row with its own prompt
    requests: int = 0  # answered with a reply
    rows: int = 0  # rows generated (requests x n)
    failed_batches: int = 0
    rejected: int = 0  # 4xx answers
    max_rows_in_a_call: int = 0


class Batcher:
    """Collects concurrent requests and runs each group of compatible ones as one generate call."""

    def __init__(self, responder: Responder, cfg: ServeConfig):
        self.responder, self.cfg = responder, cfg
        self.counters = Counters()
        self.active = 0  # requests waiting or running
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spt-generate")
        self._lock = threading.Lock()  # the counters are read from other threads (tests, /health)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            if self._loop is not loop:
                self._pending = []
            self._loop, self._wake = loop, asyncio.Event()
            self._task = loop.create_task(self._run_forever(), name="spt-batcher")

    async def submit(self, gen: GenerateConfig, rows: list[tuple[list[str], list[str]]]) -> list[Reply]:
        """Queue ``rows`` (one request) and wait for their replies; APIError 429 when the queue is full,
        504 after serve.request_timeout_s, 500 when its batch failed."""
        if self.active >= self.cfg.max_queue:
            raise APIError(429, f"server busy: {self.active} requests queued (serve.max_queue="
                                f"{self.cfg.max_queue}); retry later", code="queue_full", type_="rate_limit_error")
        self._ensure_running()
        job = Job(batch_key(gen), gen, rows, asyncio.get_running_loop().create_future())
        self.active += 1
        self._pending.append(job)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.cfg.request_timeout_s)
        except TimeoutError:
            job.abandoned = True
            raise APIError(504, f"no reply within serve.request_timeout_s={self.cfg.request_timeout_s}",
                           code="timeout") from None
        finally:
            self.active -= 1

    def _take(self) -> list[Job]:
        """The oldest job and the jobs of its key behind it, in order, up to serve.max_batch rows."""
        self._pending = [j for j in self._pending if not j.abandoned]
        if not self._pending:
            return []
        key = self._pending[0].key
        taken, rows = [], 0
        for job in self._pending:
            if job.key != key:
                continue
            if taken and rows + len(job.rows) > self.cfg.max_batch:
                break
            taken.append(job)
            rows += len(job.rows)
        ids = {id(j) for j in taken}
        self._pending = [j for j in self._pending if id(j) not in ids]
        return taken

    def _ready_rows(self, key: tuple) -> int:
        return sum(len(j.rows) for j in self._pending if j.key == key and not j.abandoned)

    async def _run_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    await self._collect()
                    jobs = self._take()
                    if jobs:
                        await self._run(jobs)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the batcher die: the jobs' futures got their error already
                    log.exception("batcher error")

    async def _collect(self) -> None:
        """Wait until the oldest job's batch window has passed or its key has a full batch."""
        first = next((j for j in self._pending if not j.abandoned), None)
        if first is None:
            return
        deadline = first.arrived + self.cfg.batch_window_ms / 1000
        while self._ready_rows(first.key) < self.cfg.max_batch and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                break

    async def _run(self, jobs: list[Job]) -> None:
        rows = [r for j in jobs for r in j.rows]
        gen = jobs[0].gen
        if gen.do_sample and gen.seed < 0:  # sampling without a seed: a fresh one per batch
            gen = dataclasses.replace(gen, seed=random.getrandbits(31))
        options = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}
        options["batch_size"] = len(rows)
        with self._lock:
            self.counters.generate_calls += 1
            self.counters.max_rows_in_a_call = max(self.counters.max_rows_in_a_call, len(rows))
        try:
            replies = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.responder.respond_many(rows, self.cfg.max_input_tokens, **options))
            if len(replies) != len(rows):
                raise RuntimeError(f"{len(replies)} replies for {len(rows)} rows")
        except Exception as e:
            log.exception("generation failed for a batch of %d request(s) (%d rows)", len(jobs), len(rows))
            with self._lock:
                self.counters.failed_batches += 1
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(APIError(500, f"generation failed ({type(e).__name__}); the server "
                                                           "log has the details", code="generation_failed"))
            return
        with self._lock:
            self.counters.rows += len(rows)
        at = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(replies[at:at + len(job.rows)])
            at += len(job.rows)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- the app ----------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get a 413 before any of them is parsed (read at most
    ``limit`` + one chunk)."""

    def __init__(self, app, limit: int, on_reject: Callable[[], None] | None = None):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        if self.on_reject is not None:
            self.on_reject()
        await error_response(413, f"request body over serve.max_body_bytes={self.limit} bytes", None,
                             "body_too_large")(scope, receive, send)


def _finish_reason(reply: Reply, tokens: int, gen: GenerateConfig) -> str:
    if tokens >= gen.max_new_tokens and not any(s in reply.raw for s in gen.stop):
        return "length"
    return "stop"


def create_app(responder: Responder, name: str = "spt", cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``responder`` as model ``name`` with the limits of ``cfg`` (default: the run's
    ``serve`` config section). ``app.state.batcher.counters`` counts generate calls."""
    cfg = cfg or responder.config.serve
    batcher = Batcher(responder, cfg)
    # Requests are tokenised (and replies counted) in a thread of their own with a tokenizer of their own:
    # a fast tokenizer must not be used from two threads at once, and the generate thread uses the other.
    encoder = Responder(copy.copy(responder.method))
    encoder.method.tokenizer = copy.deepcopy(responder.method.tokenizer)
    encode_pool = ThreadPoolExecutor(1, thread_name_prefix="spt-encode")
    created = int(time.time())

    def count_tokens(replies: list[Reply]) -> list[int]:
        return [len(encoder.method.tokenizer(r.raw, add_special_tokens=False)["input_ids"]) for r in replies]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()
        encode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="spt serve", lifespan=lifespan,
                  description="Selective Prompt Tuning: an OpenAI-compatible chat endpoint for a trained run.")
    app.state.batcher = batcher
    def count_rejected() -> None:
        with batcher._lock:
            batcher.counters.rejected += 1

    def rejected(response: JSONResponse) -> JSONResponse:
        count_rejected()
        return response

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, on_reject=count_rejected)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return rejected(exc.response()) if exc.status < 500 else exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return rejected(error_response(400, f"invalid JSON in the request body: {detail}".rstrip(": "),
                                           None, "invalid_json"))
        # the field is the common prefix of the first field's errors (a union reports one error per member,
        # with the member's name in the location: messages[0].content.str, messages[0].content.list[...])
        first = tuple(err.get("loc") or ())
        same = [e for e in exc.errors() if tuple(e.get("loc") or ())[:2] == first[:2]]
        loc = first
        for e in same:
            other = tuple(e.get("loc") or ())
            n = next((i for i, (a, b) in enumerate(zip(loc, other, strict=False)) if a != b), min(len(loc), len(other)))
            loc = loc[:n]
        param = _param(loc)
        if param is None:
            message = "the request body must be a JSON object" if err.get("type") != "missing" else \
                "the request body is missing"
        else:
            message = f"{param}: " + "; or ".join(dict.fromkeys(e.get("msg", "invalid value") for e in same))
        return rejected(error_response(400, message, param, err.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return rejected(error_response(exc.status_code, str(exc.detail), None, None))

    @app.get("/health")
    async def health() -> dict:
        """Status, counters (generate calls, requests, rows, rejected) and the batching limits."""
        with batcher._lock:
            counters = dataclasses.asdict(batcher.counters)
        return {"status": "ok", "model": name, "method": responder.config.method,
                "prompts": getattr(responder.method, "num_prompts", None), "queue": batcher.active, **counters,
                "serve": dataclasses.asdict(cfg)}

    @app.get("/v1/models")
    async def models() -> dict:
        """The served model (one)."""
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "spt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        """A reply to the last user message in the voice of the persona (OpenAI chat.completion), with an
        ``spt`` field: the selected prompt and the K retriever scores."""
        if req.model is not None and req.model != name:
            raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models lists {name!r}",
                           "model", "model_not_found")
        persona, history = dialogue(req)
        gen = _generation(req, responder.config.generate, cfg)
        limit = responder.config.data.max_length - gen.max_new_tokens
        if cfg.max_input_tokens is not None:
            limit = min(limit, cfg.max_input_tokens)
        loop = asyncio.get_running_loop()
        full, ids = await loop.run_in_executor(encode_pool, _encode, encoder, persona, history, gen.max_new_tokens,
                                               cfg.max_input_tokens)
        if full > limit and cfg.reject_long_inputs:
            raise APIError(413, f"the input is {full} tokens, over the limit of {limit} (serve.max_input_tokens "
                                f"or data.max_length minus max_tokens); shorten the messages", "messages",
                           "context_length_exceeded")
        replies = await batcher.submit(gen, [(persona, history)] * req.n)
        completion = await loop.run_in_executor(encode_pool, count_tokens, replies)
        with batcher._lock:
            batcher.counters.requests += 1
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        spt_info = {"prompt": replies[0].prompt, "scores": [_json_number(s) for s in replies[0].scores],
                    "persona": persona, "input_tokens": len(ids), "truncated": full > len(ids)}
        usage = {"prompt_tokens": len(ids), "completion_tokens": sum(completion),
                 "total_tokens": len(ids) + sum(completion)}
        reasons = [_finish_reason(r, t, gen) for r, t in zip(replies, completion, strict=True)]
        if not req.stream:
            return {**base, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                                 "finish_reason": reasons[i], "logprobs": None} for i, r in enumerate(replies)],
                    "usage": usage, "spt": spt_info}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(base, replies, reasons, usage, spt_info, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _json_number(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _encode(responder: Responder, persona, history, max_new_tokens: int, max_input_tokens: int | None):
    """(untruncated input length, the inference input as generation will encode it)."""
    try:
        return (responder.input_length(persona, history),
                responder.input_ids(persona, history, max_new_tokens, max_input_tokens))
    except ValueError as e:
        raise APIError(400, f"{e}: lower max_tokens", "max_tokens") from None


def _generation(req: ChatRequest, default: GenerateConfig, cfg: ServeConfig) -> GenerateConfig:
    """The request's decoding settings on top of the run's generate config; APIError naming the field."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(default.max_new_tokens, cfg.max_new_tokens)
    elif max_tokens > cfg.max_new_tokens:
        raise APIError(400, f"{param}={max_tokens} is over this server's limit of {cfg.max_new_tokens} "
                            f"(serve.max_new_tokens)", param, "max_tokens_exceeded")
    options: dict[str, Any] = {"max_new_tokens": max_tokens, "seed": 0}
    if req.temperature is not None:
        options["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            options["temperature"] = req.temperature
    if req.top_p is not None:
        options["top_p"] = req.top_p
        if req.top_p < 1 and req.temperature is None:
            options["do_sample"] = True
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: at most 4 non-empty strings", "stop")
        options["stop"] = [*default.stop, *stops]
    gen = dataclasses.replace(default, **options)
    if gen.do_sample:
        gen = dataclasses.replace(gen, seed=req.seed if req.seed is not None else -1)  # -1: fresh per batch
    limit = min(cfg.max_n, cfg.max_batch)
    if req.n > limit:
        raise APIError(400, f"n={req.n} is over this server's limit of {limit} (serve.max_n, serve.max_batch)", "n")
    if req.n > 1 and not gen.do_sample:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy decoding gives n identical replies",
                       "n")
    return gen


async def _sse(base: dict, replies: list[Reply], reasons: list[str], usage: dict, spt_info: dict,
               include_usage: bool):
    """The reply as OpenAI chat.completion.chunk events: role, the whole content, the finish reason, [DONE]."""
    chunk = {**base, "object": "chat.completion.chunk", "system_fingerprint": None}

    def event(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

    for i, r in enumerate(replies):
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None}])
        yield event([{"index": i, "delta": {"content": r.text}, "finish_reason": None, "logprobs": None}])
        yield event([{"index": i, "delta": {}, "finish_reason": reasons[i], "logprobs": None}], spt=spt_info)
    if include_usage:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


def serve(responder: Responder, host: str = "127.0.0.1", port: int = 8000, name: str = "spt",
          on_start: Callable[[], None] | None = None) -> None:
    """Serve until Ctrl-C (uvicorn)."""
    import uvicorn

    cfg = responder.config.serve
    app = create_app(responder, name, cfg)
    log.info("serving %s (%s) on http://%s:%d (docs: /docs); max_batch=%d, batch_window_ms=%g", name,
             responder.config.method, host, port, cfg.max_batch, cfg.batch_window_ms)
    if on_start is not None:
        on_start()
    uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=2 * cfg.max_queue + 16,
                timeout_keep_alive=5)
