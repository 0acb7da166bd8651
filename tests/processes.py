"""Finding live processes by a token on their command line, for the tests that check a program's
children died with it (tests/test_code_rewards.py, tests/test_sandbox.py)."""

from __future__ import annotations

import time
from pathlib import Path


def running_with(token: str, wait_s: float = 0.0, but: int | None = None) -> list[int]:
    """Live (not zombie) processes but `but` whose command line holds `token`, after waiting up to `wait_s`
    for none."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [int(e.name) for e in Path("/proc").iterdir() if _live_with(e, token.encode()) and e.name != str(but)]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def _live_with(entry: Path, token: bytes) -> bool:
    try:
        cmdline = (entry / "cmdline").read_bytes()
        state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return token in cmdline and state != "Z"
