"""Tool calls in the OpenAI response shape, from the `<tool_call>` blocks the model writes.

The parsing is `nanoseek.envs.tools`' (the one the environments use); this module only shapes its
calls as OpenAI's `tool_calls` ({"id", "type": "function", "function": {"name", "arguments": JSON text}})
and, for streams, holds text back from the first `<tool_call>` on so the raw block is never sent as content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from nanoseek.envs.tools import TOOL_CALL_OPEN
from nanoseek.envs.tools import split_tool_calls as split_blocks


def openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in calls
    ]


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the content outside the blocks, the well-formed calls in OpenAI's shape)."""
    content, calls = split_blocks(text)
    return content, openai_calls(calls)


class ToolCallStream:
    """One streamed sample: `feed(text, done)` -> (content to send now, tool_calls deltas or None).

    Text that might begin a `<tool_call>` block is held back; at the end the held text is parsed and its
    well-formed calls go out in one chunk (each with its index, as OpenAI streams them)."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str, done: bool) -> tuple[str, list[dict[str, Any]] | None]:
        self.held += text
        if not done:
            start = self.held.find(TOOL_CALL_OPEN)
            if start < 0:  # keep only a tail that could still grow into "<tool_call>"
                keep = next(
                    (k for k in range(len(TOOL_CALL_OPEN) - 1, 0, -1) if self.held.endswith(TOOL_CALL_OPEN[:k])), 0
                )
                start = len(self.held) - keep
            out, self.held = self.held[:start], self.held[start:]
            return out, None
        held, self.held = self.held, ""
        content, calls = split_tool_calls(held)
        if not calls:
            return held, None
        return content, [{"index": i, **call} for i, call in enumerate(calls)]


__all__ = ["ToolCallStream", "openai_calls", "split_tool_calls"]
