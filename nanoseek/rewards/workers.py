"""Worker processes: a time limit that works from any thread.

math-verify's own timeouts use `signal.alarm`, which only works in the main thread, and a reward
function given by import path may hang; so both run in small pools of persistent worker *processes*.
A pool runs one function named by import path ("package.module:function" or "path/file.py:function",
see `loading`), optionally after a setup function, and a request is that function's arguments. A
request that exceeds its time limit kills and restarts its worker. Used by `mathcheck` (math-verify)
and by `RewardSet` (reward functions given by import path).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoseek.rewards.loading import load_callable

__all__ = [
    "WorkerDied",
    "WorkerError",
    "WorkerInputError",
    "WorkerPool",
    "WorkerStartError",
    "WorkerTimeout",
    "shutdown_workers",
]

# A worker is `python -c "...; _worker_main()"` talking length-prefixed pickles over its stdin and
# stdout. We use a plain subprocess rather than multiprocessing so that the parent's `__main__` is
# never re-imported (a script without an `if __name__ == "__main__"` guard would recurse) and so that a
# worker is a fresh interpreter no matter how the parent was started. The worker moves the protocol
# to private file descriptors and points fd 1 at stderr, so a reward function that prints cannot
# corrupt the channel.

_FRAME = struct.Struct("<Q")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the nanoseek package
_BOOT = "from nanoseek.rewards.workers import _worker_main; _worker_main()"


class WorkerTimeout(Exception):
    """The worker did not answer within the time limit (it has been killed)."""


class WorkerDied(Exception):
    """The worker process exited or its pipe broke (it has been replaced)."""


class WorkerError(Exception):
    """The code running in the worker raised; `kind` is the exception's type name."""

    def __init__(self, kind: str, message: str, tb: str = ""):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.tb = tb


class WorkerInputError(Exception):
    """The request could not be pickled for the worker (e.g. a row holds an open file)."""


class WorkerStartError(RuntimeError):
    """A worker could not start (its preload failed or it did not get ready in time)."""


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _write_frame(stream: Any, data: bytes) -> None:
    stream.write(_FRAME.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame_blocking(stream: Any) -> bytes:
    """Child side: read one frame's bytes; exit quietly when the parent has gone away (EOF)."""

    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = stream.read(n - len(buf))
            if not chunk:
                os._exit(0)
            buf += chunk
        return bytes(buf)

    (size,) = _FRAME.unpack(exact(_FRAME.size))
    return exact(size)


class _Worker:
    """One worker subprocess seen from the parent. Used by one thread at a time (the pool ensures it)."""

    def __init__(self, target: str, setup: str | None):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: a kill also reaches anything it spawned
        )
        self._fd = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()  # epoll/kqueue: no FD_SETSIZE limit, unlike select()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self.ready = False
        init = {"target": target, "setup": setup, "sys_path": [p for p in sys.path if isinstance(p, str)]}
        try:
            _write_frame(self.proc.stdin, _dumps(init))
        except OSError:
            pass  # it died at once; ensure_ready reports it

    def _read_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise WorkerTimeout
            chunk = os.read(self._fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise WorkerDied(f"worker exited with code {self.proc.poll()}")
            buf += chunk
        return bytes(buf)

    def _recv(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        (size,) = _FRAME.unpack(self._read_exact(_FRAME.size, deadline))
        return pickle.loads(self._read_exact(size, deadline))

    def ensure_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            status, payload = self._recv(timeout_s)
        except WorkerTimeout:
            raise WorkerStartError(f"worker not ready after {timeout_s:.0f} s") from None
        except WorkerDied as e:
            raise WorkerStartError(str(e)) from None
        if status != "ready":
            kind, message, _tb = payload
            raise WorkerStartError(f"{kind}: {message}")
        self.ready = True

    def request(self, data: bytes, timeout_s: float) -> Any:
        """Send a pickled tuple of arguments and wait up to timeout_s for the reply."""
        try:
            _write_frame(self.proc.stdin, data)
        except (OSError, ValueError) as e:  # broken pipe, or stdin closed
            raise WorkerDied(f"cannot write to worker: {e}") from None
        status, payload = self._recv(timeout_s)
        if status == "ok":
            return payload
        raise WorkerError(*payload)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            self._selector.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()


_ALL_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


class WorkerPool:
    """Up to `size` workers that run `target` ("module:function"), started lazily (each calls `setup()`
    once first, if given), handed to one calling thread at a time.

    A request that times out, or whose worker dies, kills that worker and starts a replacement at
    once (its startup overlaps whatever the caller does next). The time limit covers the request
    only: waiting for a free worker, or for a fresh one to finish importing, does not count.
    """

    def __init__(self, target: str, size: int, setup: str | None = None, start_timeout_s: float = 120.0):
        if size < 1:
            raise ValueError(f"worker pool size must be >= 1, got {size}")
        self.target, self.setup, self.size = target, setup, size
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._busy: set[_Worker] = set()
        self._created = 0
        self._lock = threading.Lock()
        self._closed = False
        self.pid = os.getpid()
        _ALL_POOLS.add(self)

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = None
                if self._created < self.size:
                    self._created += 1
                    worker = _Worker(self.target, self.setup)
            if worker is not None:
                self._busy.add(worker)
                return worker
        while True:  # all workers busy: wait for one, but notice a pool closed meanwhile
            try:
                worker = self._idle.get(timeout=1.0)
                break
            except queue.Empty:
                if self._closed:
                    raise RuntimeError("worker pool is closed") from None
        with self._lock:
            self._busy.add(worker)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if self._closed:
                worker.kill()
                return
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._busy.discard(worker)
            self.restarts += 1
            if self._closed:
                return
        self._idle.put(_Worker(self.target, self.setup))

    def run(self, args: tuple, timeout_s: float) -> Any:
        """`target(*args)` in a worker; raises WorkerTimeout, WorkerDied, WorkerError, WorkerInputError
        or WorkerStartError."""
        try:
            data = _dumps(args)
        except Exception as e:
            raise WorkerInputError(f"cannot send the arguments to a worker process: {type(e).__name__}: {e}") from None
        worker = self._checkout()
        try:
            worker.ensure_ready(self.start_timeout_s)
            result = worker.request(data, timeout_s)
        except WorkerError:
            self._checkin(worker)
            raise
        except BaseException:
            self._replace(worker)
            raise
        self._checkin(worker)
        return result

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            busy = list(self._busy)
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break
        for worker in busy:
            worker.kill()


def shutdown_workers() -> None:
    """Kill every worker process this process started (also runs at interpreter exit).

    A pool that is used again afterwards (math_equal's) is replaced by a fresh one on its next use.
    """
    for pool in list(_ALL_POOLS):
        if pool.pid == os.getpid():
            pool.close()


atexit.register(shutdown_workers)


# ---- child side ----------------------------------------------------------------------------------


def _orphan_watchdog(parent_pid: int) -> None:
    """Exit when the parent dies, even while the main thread is stuck in a hung computation."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main() -> None:
    """Entry point of a worker process (see _Worker). Serves requests until its stdin closes."""
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # user code reading stdin must not eat the protocol
    os.dup2(2, 1)  # prints go to stderr, not into the protocol
    threading.Thread(target=_orphan_watchdog, args=(os.getppid(),), daemon=True).start()

    init = pickle.loads(_read_frame_blocking(proto_in))
    sys.path[:] = init["sys_path"]
    try:
        fn: Callable[..., Any] = load_callable(init["target"], "worker function")
        if init["setup"]:
            load_callable(init["setup"], "worker setup")()
    except BaseException as e:
        _write_frame(proto_out, _dumps(("error", (type(e).__name__, str(e), traceback.format_exc()))))
        return
    _write_frame(proto_out, _dumps(("ready", None)))

    while True:
        request = _read_frame_blocking(proto_in)
        try:
            result = fn(*pickle.loads(request))
            reply = _dumps(("ok", result))  # a result that cannot be sent back is the function's error
        except BaseException as e:
            reply = _dumps(("error", (type(e).__name__, str(e)[:2000], traceback.format_exc()[-4000:])))
        _write_frame(proto_out, reply)
