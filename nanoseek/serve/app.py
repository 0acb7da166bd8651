"""The routes: the OpenAI API under /v1, /health, /metrics, and the web chat at /.

Each request: key check, body (capped, timed), schema, prompt tokens (rendered and encoded off the
event loop), limits, then one channel to the engine worker. Non-streamed answers wait for the worker
while watching the client: one that leaves or passes the time limit has its request cancelled, which
frees its KV slots between two decode steps. Streamed answers start once the first token is there
(so an engine error is still a 400) and are cancelled the same way when the client goes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from nanoseek.engine.requests import Completion, Delta
from nanoseek.serve import openai_format as fmt
from nanoseek.serve.limits import Limits, check_api_key, read_body
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.schemas import ApiError, ChatRequest, CompletionRequest, error_response, parse
from nanoseek.serve.worker import Channel, EngineWorker, Scores

STATIC = Path(__file__).parent / "static"
TOKENIZER_THREADS = 2
INLINE_BODY_BYTES = 16 * 1024
CLIENT_GONE = 499  # nginx's status for "the client closed the connection": counted, never sent


@dataclass
class ServeState:
    worker: EngineWorker
    tokenizer: Any
    model_name: str
    limits: Limits
    api_key: str | None
    metrics: Metrics = field(init=False)
    token_text: fmt.TokenText = field(init=False)
    cpu: ThreadPoolExecutor = field(init=False)
    """Renders and tokenizes prompts off the event loop: a fixed pool (threads do not grow with clients)."""

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.model_name)
        self.token_text = fmt.TokenText(self.tokenizer)
        self.cpu = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="nanoseek-tokenize")

    async def tokenize(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) for a body of `size` bytes: on the loop when small (a thread hop would cost more), else
        on the pool, so that one large prompt does not hold up every other client."""
        if size <= INLINE_BODY_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)


class ClientGone(Exception):
    pass


class Job:
    """One HTTP request's prompts on one channel, and its timing for the metrics."""

    def __init__(self, state: ServeState, prompts: list[list[int]], top_logprobs: int, temperature: float) -> None:
        self.state, self.prompts = state, prompts
        self.channel = Channel(asyncio.get_running_loop(), top_logprobs, temperature)
        self.arrived = time.perf_counter()
        self.deadline = self.arrived + state.limits.request_timeout_s
        self.first_token: float | None = None
        self.last_token: dict[tuple[int, int], float] = {}

    def submit(self, params) -> None:
        self.state.limits.check_queue(self.state.worker.backlog)
        for i, ids in enumerate(self.prompts):
            self.state.worker.submit(ids, params, self.channel, index=i)
        self.state.metrics.prompt_tokens += sum(len(p) for p in self.prompts)

    def saw(self, delta: Delta, index: int) -> None:
        now, metrics, k = time.perf_counter(), self.state.metrics, len(delta.token_ids)
        metrics.generation_tokens += k
        if self.first_token is None:
            self.first_token = now
            metrics.ttft.observe(now - self.arrived)
        last = self.last_token.get((index, delta.sample))
        if last is not None and k:
            metrics.itl.observe((now - last) / k, k)
        self.last_token[(index, delta.sample)] = now

    def cancel(self) -> None:
        self.state.worker.cancel(self.channel)

    def past_time_limit(self) -> str:
        """The 504's message, for an answer and for a stream alike."""
        return f"the request ran past the server's time limit of {self.state.limits.request_timeout_s:g} s"


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def guarded(request: Request, job: Job, work: Awaitable[Any], channel: Channel | None = None) -> Any:
    """`work`'s result, unless the client leaves (ClientGone) or time runs out (504) first: then the
    channel's engine requests are cancelled. (One watcher task; `work` runs in this task: no extra hop.)"""
    this, gone = asyncio.current_task(), False

    async def watch() -> None:
        nonlocal gone
        await _client_gone(request)
        gone = True
        this.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async with asyncio.timeout(max(job.deadline - time.perf_counter(), 0.0)):
            return await work
    except TimeoutError:
        job.state.worker.cancel(channel or job.channel)
        raise ApiError(504, job.past_time_limit()) from None
    except asyncio.CancelledError:
        if not gone:  # cancelled from outside (shutdown): not ours to handle
            raise
        this.uncancel()
        job.state.worker.cancel(channel or job.channel)
        raise ClientGone from None
    finally:
        watcher.cancel()


async def collect(job: Job) -> dict[tuple[int, int], Completion]:
    """Every (prompt index, sample) -> its completion; ApiError 400 on an engine error."""
    done, out = 0, {}
    while done < len(job.prompts):
        kind, value, _, index = await job.channel.get()
        if kind == "error":
            job.cancel()
            raise ApiError(400, value)
        if kind == "done":
            done += 1
            continue
        job.saw(value, index)
        if value.completion is not None:
            out[(index, value.sample)] = value.completion
    return out


async def score(request: Request, job: Job, ids: list[int], k: int) -> Scores:
    """Teacher-forced log-probs of ids (and the top k at each position), from the worker thread."""
    channel = Channel(asyncio.get_running_loop(), k, job.channel.temperature)
    job.state.worker.score(ids, channel)
    kind, value, _, _ = await guarded(request, job, channel.get(), channel)
    if kind == "error":
        raise ApiError(500, value)
    return value


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def stream(
    request: Request, job: Job, chunks: Callable[[Delta, Any, int], list[dict]], meta: dict, include_usage: bool
) -> Response:
    """Server-sent events: a chunk per choice that `chunks(delta, top, index)` gives, then usage, then [DONE].
    Events that queued up while the client was being written to go out in one write."""
    first = await guarded(request, job, job.channel.get())
    if first[0] == "error":
        job.cancel()
        raise ApiError(400, first[1])
    # Every chunk is the same object around its choice: encode that once, and only the choice per token.
    head = json.dumps(meta, separators=(",", ":"))[:-1].encode()
    prefix, suffix = b"data: " + head + b',"choices":[', b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"

    def error(message: str, kind: str, code: int) -> bytes:
        return sse({**meta, "error": {"message": message, "type": kind, "code": code}})

    async def events() -> AsyncIterator[bytes]:
        event, done, n_out, out = first, 0, 0, []
        queue = job.channel.queue
        # The time limit as one timer per stream that queues a "timeout" event: a timeout context around every
        # wait cost 5.7-7.0 us an event against 0.4-0.5 us for the wait alone (uvloop, 2-core CPU; docs/LOG.md
        # 2026-12-04), paid per token per stream on the one event-loop thread.
        remaining = max(job.deadline - time.perf_counter(), 0.0)
        timer = asyncio.get_running_loop().call_later(remaining, queue.put_nowait, ("timeout", None, None, 0))
        try:
            while True:
                kind, value, top, index = event
                if kind == "error":
                    out.append(error(value, "server_error", 500))
                    break
                if kind == "timeout":
                    out.append(error(job.past_time_limit(), "timeout_error", 504))
                    break
                if kind == "done":
                    done += 1
                    if done == len(job.prompts):
                        break
                else:
                    job.saw(value, index)
                    n_out += len(value.token_ids)
                    for choice in chunks(value, top, index):
                        out.append(prefix + json.dumps(choice, separators=(",", ":")).encode() + suffix)
                if not queue.empty():
                    event = queue.get_nowait()
                    continue
                if out:
                    yield b"".join(out)
                    out = []
                event = await queue.get()
            if include_usage:
                out.append(sse({**meta, "choices": [], "usage": fmt.usage(sum(map(len, job.prompts)), n_out)}))
            out.append(b"data: [DONE]\n\n")
            yield b"".join(out)
        finally:
            timer.cancel()
            job.cancel()  # a client that left, a time limit or an error: free the slots (a no-op when all done)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ----------------------------------------------------------------------------- /v1 routes
async def chat_completions(request: Request, state: ServeState) -> Response:
    from nanoseek.serve.tool_calls import ToolCallStream, split_tool_calls

    check_api_key(request, state.api_key)
    raw = await read_body(request, state.limits)
    req = parse(ChatRequest, raw)
    prompt = await state.tokenize(len(raw), fmt.chat_prompt_ids, req, state.tokenizer)
    state.limits.check_prompt(len(prompt), state.worker.engine.max_seq_len)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = fmt.sampling_params(req, max_tokens, state.limits)
    top_k = (req.top_logprobs or 0) if req.logprobs else 0
    job = Job(state, [prompt], top_k if req.stream else 0, req.temperature or 1.0)
    job.submit(params)
    meta = fmt.response_meta(True, state.model_name)
    tools = bool(req.tools) and req.tool_choice != "none"

    def logprobs_of(tokens: list[int], logprobs: list[float], top) -> dict | None:
        return {"content": fmt.chat_logprobs(tokens, logprobs, top, state.token_text)} if req.logprobs else None

    if req.stream:
        greeted: set[int] = set()  # samples whose first chunk (with the role, as OpenAI sends it) went out
        calls = {s: ToolCallStream() for s in range(req.n)} if tools else {}

        def chunks(delta: Delta, top, _: int) -> list[dict]:
            done = delta.completion is not None
            text, tool_calls = calls[delta.sample].feed(delta.text, done) if tools else (delta.text, None)
            if not (text or done or tool_calls or (req.logprobs and delta.token_ids)):
                return []
            piece: dict[str, Any] = {} if delta.sample in greeted else {"role": "assistant"}
            greeted.add(delta.sample)
            piece["content"] = text
            if tool_calls:
                piece["tool_calls"] = tool_calls
            reason = None
            if done:
                reason = "tool_calls" if tool_calls else fmt.finish_reason(delta.completion)
            n_shown = len(delta.token_ids) - (1 if done and isinstance(delta.completion.stop, int) else 0)
            choice = {"index": delta.sample, "delta": piece, "finish_reason": reason}
            choice["logprobs"] = logprobs_of(delta.token_ids[:n_shown], delta.logprobs[:n_shown], top)
            return [choice]

        return await stream(request, job, chunks, {**meta, "object": "chat.completion.chunk"}, req.include_usage)

    completions = await guarded(request, job, collect(job))
    choices = []
    for (_, sample), c in sorted(completions.items()):
        message: dict[str, Any] = {"role": "assistant", "content": c.text or ""}
        reason = fmt.finish_reason(c)
        if tools:
            message["content"], tool_calls = split_tool_calls(c.text or "")
            if tool_calls:
                message["tool_calls"], reason = tool_calls, "tool_calls"
        tokens = fmt.shown_tokens(c)
        top = None
        if req.logprobs and top_k:
            top = (await score(request, job, prompt + tokens, top_k)).top[len(prompt) - 1 :]
        choice = {"index": sample, "message": message, "logprobs": logprobs_of(tokens, c.logprobs, top)}
        choices.append({**choice, "finish_reason": reason})
    n_out = sum(len(c.token_ids) for c in completions.values())
    body = {**meta, "object": "chat.completion", "choices": choices, "usage": fmt.usage(len(prompt), n_out)}
    return JSONResponse(body)


async def completions(request: Request, state: ServeState) -> Response:
    check_api_key(request, state.api_key)
    raw = await read_body(request, state.limits)
    req = parse(CompletionRequest, raw)
    engine = state.worker.engine
    prompts = await state.tokenize(len(raw), fmt.completion_prompts, req, state.tokenizer, engine.vocab_size)
    for ids in prompts:
        state.limits.check_prompt(len(ids), engine.max_seq_len)
    k = req.logprobs
    job = Job(state, prompts, (k or 0) if req.stream else 0, req.temperature or 1.0)
    meta = fmt.response_meta(False, state.model_name)
    echo_only = req.echo and req.max_tokens == 0  # score the prompts, generate nothing (log-likelihoods)
    if req.stream and req.echo:
        raise ApiError(400, "echo: not supported with stream", "echo")
    if not echo_only:
        job.submit(fmt.sampling_params(req, req.max_tokens, state.limits))
    if req.stream:

        def chunks(delta: Delta, top, index: int) -> list[dict]:
            done = delta.completion is not None
            if not (delta.text or done):
                return []
            choice = {"index": index * req.n + delta.sample, "text": delta.text, "logprobs": None}
            if k is not None:
                scores = Scores(delta.logprobs, top or [])
                ids = [0, *delta.token_ids]  # scores.logprobs[i] is the log-prob of ids[i + 1]
                choice["logprobs"] = fmt.completion_logprobs(ids, scores, 1, k, state.token_text)
            choice["finish_reason"] = fmt.finish_reason(delta.completion) if done else None
            return [choice]

        return await stream(request, job, chunks, {**meta, "object": "text_completion"}, req.include_usage)

    done = {} if echo_only else await guarded(request, job, collect(job))
    choices, n_out = [], 0
    for i, ids in enumerate(prompts):
        prompt_text = req.prompt if isinstance(req.prompt, str) else state.tokenizer.decode(ids)
        for sample in range(req.n):
            c = done.get((i, sample))
            tokens = fmt.shown_tokens(c) if c else []
            n_out += len(c.token_ids) if c else 0
            text = (prompt_text if req.echo else "") + (c.text or "" if c else "")
            logprobs = None
            if k is not None:
                first = 0 if req.echo else len(ids)
                scores = await score(request, job, ids + tokens, k)
                logprobs = fmt.completion_logprobs(ids + tokens, scores, first, k, state.token_text)
            reason = fmt.finish_reason(c) if c else "length"
            choices.append({"index": i * req.n + sample, "text": text, "logprobs": logprobs, "finish_reason": reason})
    usage = fmt.usage(sum(map(len, prompts)), n_out)
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})


async def models(request: Request, state: ServeState) -> Response:
    check_api_key(request, state.api_key)
    model = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "nanoseek"}
    return JSONResponse({"object": "list", "data": [model]})


# ----------------------------------------------------------------------------- the rest
async def health(request: Request, state: ServeState) -> Response:
    worker = state.worker
    auth = state.api_key is not None
    return JSONResponse({"status": "ok", "running": worker.running, "queued": worker.backlog, "auth": auth})


async def metrics(request: Request, state: ServeState) -> Response:
    return PlainTextResponse(state.metrics.render(state.worker), media_type="text/plain; version=0.0.4")


async def index(request: Request, state: ServeState) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def endpoint(route: str, handler: Callable[[Request, ServeState], Awaitable[Response]]):
    async def run(request: Request) -> Response:
        state: ServeState = request.app.state.serve
        try:
            response = await handler(request, state)
        except ApiError as e:
            response = e.response()
        except ClientGone:
            state.metrics.count(route, CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        state.metrics.count(route, response.status_code)
        return response

    return run


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    state: ServeState = request.app.state.serve
    state.metrics.count("other", exc.status_code)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}")


def build_app(
    worker: EngineWorker,
    tokenizer: Any,
    *,
    model_name: str = "nanoseek",
    limits: Limits | None = None,
    api_key: str | None = None,
    cors_origins: tuple[str, ...] = (),
) -> Starlette:
    routes = [
        Route("/v1/chat/completions", endpoint("chat", chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/health", endpoint("health", health), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics), methods=["GET"]),
        Route("/", endpoint("index", index), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.serve = ServeState(worker, tokenizer, model_name, limits or Limits(), api_key)
    return app


__all__ = ["ServeState", "build_app"]
