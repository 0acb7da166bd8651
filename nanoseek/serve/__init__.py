"""`nanoseek serve`: the OpenAI API and a web chat over one engine, on uvicorn + Starlette.

    nanoseek serve --checkpoint runs/rl                  # http://127.0.0.1:8000/ (chat), /v1 (API), /metrics

Modules, one seam each: `worker` (the thread that owns the engine), `schemas` (request bodies, error
shape), `limits` (caps, key, timeouts), `openai_format` (requests -> engine, completions -> JSON),
`tool_calls` (`<tool_call>` blocks -> OpenAI tool_calls), `metrics` (Prometheus text), `app` (routes),
`server` (uvicorn, sockets, shutdown), `static/` (the chat page).
"""

from nanoseek.serve.limits import Limits
from nanoseek.serve.server import Server

__all__ = ["Limits", "Server"]
