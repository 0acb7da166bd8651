"""What the `nanoseek serve` tests share: a tiny served model, HTTP helpers and the naive greedy reference
(a loop that recomputes the whole sequence every step: no engine, no cache)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.engine import Engine
from nanoseek.model import Transformer, get_preset
from nanoseek.serve import Limits, Server
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer


@dataclass
class Served:
    url: str
    model: Transformer
    tokenizer: Tokenizer
    engine: Engine
    server: Server

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_tiny(
    max_batch: int = 4, limits: Limits | None = None, max_seq_len: int = 128, **server_kwargs: Any
) -> Served:
    tokenizer = Tokenizer.train(pretrain_texts(300, seed=0), 400)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=448, init_std=0.2, max_seq_len=max(512, max_seq_len))).eval()
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
    server = Server(engine, tokenizer, ("127.0.0.1", 0), model_name="tiny-test", limits=limits, **server_kwargs)
    server.start()
    return Served(server.url, model, tokenizer, engine, server)


def post(
    url: str, path: str, body: dict | bytes, headers: dict | None = None, method: str = "POST"
) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes, read until the server closes (its keep-alive timeout) or is silent for `timeout`."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def sse_events(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().split("\n\n") if line.startswith("data: ")]


@torch.no_grad()
def naive_greedy_ids(model: Transformer, ids: list[int], n: int, stop_ids: list[int]) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
    return out


def naive_greedy_text(model: Transformer, tokenizer: Tokenizer, messages: list[dict], n: int) -> str:
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    out = naive_greedy_ids(model, ids, n, tokenizer.stop_ids)
    return tokenizer.decode(out[:-1] if out and out[-1] in tokenizer.stop_ids else out)


def chat(content: str, **fields: Any) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16, **fields}
