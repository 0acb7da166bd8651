"""An OpenAI-compatible HTTP server over one engine: concurrent clients share its continuous batch.

    nanoseek serve --checkpoint runs/rl --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "What is 41 + 6?"}]}'

Endpoints: `POST /v1/chat/completions` (messages through the chat template), `POST /v1/completions`
(a raw prompt), both with `stream: true` for server-sent events; `GET /v1/models`, `GET /health`.
Request fields: max_tokens (or max_completion_tokens), temperature, top_p, top_k, min_p, n, seed,
stop (a string or a list), ignore_eos (as vLLM's server has it). A bad request gets HTTP 400 with
the field named; the others go on.

Threads: the standard library's threading HTTP server gives each connection a thread, and one
worker thread owns the engine (every engine call happens there). A handler puts its request in the
worker's inbox and reads deltas from its own queue; the worker admits new requests between decode
steps, so a request joins the running batch at once and leaves it when done. A client that goes
away mid-stream has its request aborted, which frees its KV slots.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nanoseek.engine.engine import Completion, Delta, DeltaTracker, Engine, Request
from nanoseek.engine.sampling import SamplingParams


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400); the message names the field."""


class EngineWorker:
    """The one thread that drives the engine; other threads submit through `submit` and `cancel`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._active: dict[Request, tuple[DeltaTracker, queue.Queue]] = {}
        self._stopping = False
        self.cancelled = 0
        """Requests aborted because their client went away."""
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> queue.Queue:
        """Queue a request; its queue then yields ("error", message) or ("delta", Delta)... then ("done", None)."""
        out: queue.Queue = queue.Queue()
        self._inbox.put(("submit", prompt_ids, params, out))
        return out

    def cancel(self, out: queue.Queue) -> None:
        self._inbox.put(("cancel", None, None, out))

    def close(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None, None, None))
        self._thread.join(timeout=10)

    def _take(self, block: bool) -> None:
        while True:
            try:
                kind, prompt, params, out = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                try:
                    request = self.engine.submit(prompt, params)
                except ValueError as e:
                    out.put(("error", str(e)))
                    continue
                self._active[request] = (DeltaTracker(self.engine, request), out)
            elif kind == "cancel":
                for request, (_, target) in list(self._active.items()):
                    if target is out:
                        self.engine.abort(request)
                        del self._active[request]
                        self.cancelled += 1

    def _run(self) -> None:
        while not self._stopping:
            self._take(block=not self.engine.has_work)
            if self._stopping or not self.engine.has_work:
                continue
            try:
                self.engine.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                for request, (_, out) in list(self._active.items()):
                    self.engine.abort(request)
                    out.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                self._active.clear()
                continue
            for request, (tracker, out) in list(self._active.items()):
                for delta in tracker.poll():
                    out.put(("delta", delta))
                if request.done:
                    out.put(("done", None))
                    del self._active[request]
        self.engine.abort_all()


# --------------------------------------------------------------------------------------------------
# Requests and responses in the OpenAI format
# --------------------------------------------------------------------------------------------------


def sampling_params(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    """SamplingParams from an OpenAI-style body; the engine checks the values (and names a bad one)."""
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop: expected a non-empty string or a list of them")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos: expected true or false")
    return SamplingParams.from_config(body, max_new_tokens=max_tokens, stop_strings=stop, ignore_eos=ignore_eos)


def prompt_of(body: dict[str, Any], chat: bool, tokenizer: Any) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: expected a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRequest(f"messages[{i}]: expected {{'role': str, 'content': str}}")
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True
            )
        except Exception as e:  # no template, or the template's own raise_exception (e.g. roles out of order)
            raise BadRequest(f"messages: the chat template cannot render them: {e}") from None
    else:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise BadRequest("prompt: expected a non-empty string")
    return tokenizer.encode(text)


def finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


class _Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "owned_by": "nanoseek"}
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._error(404, f"no route POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            prompt = prompt_of(body, chat, self.server.tokenizer)
            params = sampling_params(body, self.server.default_max_tokens)
        except json.JSONDecodeError as e:
            self._error(400, f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")
            return
        except BadRequest as e:
            self._error(400, str(e))
            return
        out = self.server.worker.submit(prompt, params)
        meta = dict(
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=self.server.model_name,
        )
        if body.get("stream"):
            self._stream(out, chat, meta, len(prompt))
        else:
            self._whole(out, chat, meta, len(prompt), params.n)

    def _events(self, out: queue.Queue):
        while True:
            kind, value = out.get()
            if kind == "done":
                return
            yield kind, value

    def _whole(self, out: queue.Queue, chat: bool, meta: dict[str, Any], n_prompt: int, n: int) -> None:
        completions: dict[int, Completion] = {}
        for kind, value in self._events(out):
            if kind == "error":
                self._error(400, value)
                return
            delta: Delta = value
            if delta.completion is not None:
                completions[delta.sample] = delta.completion
        choices = []
        for i in range(n):
            c = completions[i]
            text = c.text or ""
            content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": i, **content, "finish_reason": finish_reason(c)})
        n_out = sum(len(c.token_ids) for c in completions.values())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        obj = "chat.completion" if chat else "text_completion"
        self._json(200, {**meta, "object": obj, "choices": choices, "usage": usage})

    def _stream(self, out: queue.Queue, chat: bool, meta: dict[str, Any], n_prompt: int) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        started = False
        greeted: set[int] = set()  # samples whose first chunk (with the role, as OpenAI sends it) went out
        try:
            for kind, value in self._events(out):
                if kind == "error":
                    if not started:
                        self._error(400, value)
                        return
                    self._send_event({**meta, "object": obj, "error": {"message": value}})
                    break
                if not started:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    started = True
                delta: Delta = value
                done = delta.completion is not None
                if delta.text or done:
                    role = {} if delta.sample in greeted else {"role": "assistant"}
                    greeted.add(delta.sample)
                    piece = {"delta": {**role, "content": delta.text}} if chat else {"text": delta.text}
                    reason = finish_reason(delta.completion) if done else None
                    choice = {"index": delta.sample, **piece, "finish_reason": reason}
                    self._send_event({**meta, "object": obj, "choices": [choice]})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.worker.cancel(out)  # the client left: free its slots
        self.close_connection = True

    def _send_event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """`Server(engine, tokenizer, ("127.0.0.1", 8000)).serve_forever()`; port 0 picks a free port."""

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: the default 5 resets connections under a burst of clients

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        address: tuple[str, int] = ("127.0.0.1", 8000),
        *,
        model_name: str = "nanoseek",
        default_max_tokens: int = 256,
        verbose: bool = False,
    ) -> None:
        super().__init__(address, _Handler)
        self.tokenizer, self.model_name = tokenizer, model_name
        self.default_max_tokens, self.verbose = default_max_tokens, verbose
        self.worker = EngineWorker(engine)

    def server_close(self) -> None:
        super().server_close()
        self.worker.close()


__all__ = ["BadRequest", "EngineWorker", "Server", "sampling_params"]
