"""Running the model's programs: `run_python`, its fork server (`_zygote.py`) and the isolation levels.

RL on code runs programs that a model wrote while it was being rewarded for passing tests; sooner or
later such a program reaches outside the test. Each program is a process of its own, forked from a
small server (`_zygote.py`, a `python -I` that imports nothing of ours: forking it takes a few ms where
starting an interpreter takes ~30) into its own job directory, with fds 0/1/2 only, an empty
environment but PATH, LANG and HOME = TMPDIR = the job directory, resource limits (address space,
CPU seconds, file size, no core files) and a wall-clock limit. Output goes to files whose size the
file-size limit bounds, so a program printing forever cannot fill this process's memory.

Two levels of containment, chosen by `configure_sandbox` (the setting `rewards.sandbox`):

- `namespaces` (Linux, where unprivileged user namespaces are allowed): the server runs in its own
  user, mount, UTS, IPC and network namespaces, as `nobody` when started by root; each program in
  new PID, mount, IPC and network namespaces (loopback only) and a read-only view holding the system
  directories and the Python installation, its own job directory the one writable place, a private
  /proc and /dev/shm, no capabilities and no_new_privs. Everything it starts dies with it.
- `process`: the program runs as the trainer's user in its own session; at its end the server kills
  that session's process group and, as a child subreaper, every process that outlived its parent
  (`setsid` and double-fork escapes). It can still read what the user can, write where the user can,
  use the network, see other processes, and fork without bound until its wall-clock limit.
- `auto` (the default): `namespaces` where the machine allows it, else `process`; which one is
  printed when the server starts. The environment variable NANOSEEK_SANDBOX, when set, replaces
  `auto` (a machine's or a test run's choice); an explicit level always wins.

A failure of the sandbox itself (the server killed, namespaces refused) gives the program the status
"sandbox_error": it scores 0, is counted in `sandbox_stats()` and logged once per kind, and never
raises in the trainer. The README's "Code sandbox" section lists what each level contains, as
tests/test_sandbox.py probes it.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "SANDBOX_LEVELS",
    "ExecLimits",
    "ExecResult",
    "SandboxError",
    "SandboxStats",
    "configure_sandbox",
    "run_python",
    "sandbox_level",
    "sandbox_stats",
]

SANDBOX_LEVELS = ("auto", "namespaces", "process")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecLimits:
    """Per-program limits. 0 turns a limit off (the wall-clock limit cannot be turned off)."""

    timeout_s: float = 5.0  # wall clock, everything the program started killed after it
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    output_bytes: int = 1 << 20  # largest file the program may write, stdout included (RLIMIT_FSIZE)
    processes: int = 1024  # namespaces level: processes and threads at once (RLIMIT_NPROC; a fork bomb's bound)


@dataclass
class ExecResult:
    status: str  # "ok" (exit 0), "error", "timeout", "memory_limit", "output_limit", "killed", "sandbox_error"
    returncode: int | None
    stdout: str
    stderr: str  # its last 2000 characters (for "sandbox_error": what failed)


@dataclass
class SandboxStats:
    level: str | None  # the level programs run at ("namespaces" or "process"); None before the first
    programs: int = 0  # programs run to an answer
    failures: int = 0  # programs scored 0 because the sandbox itself failed


class SandboxError(RuntimeError):
    """The sandbox itself failed: its server died or could not start at the level asked for."""


class _ForkServer:
    """The parent's side of `_zygote.py`: one server process, many programs in flight (one per thread)."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.base = Path(tempfile.mkdtemp(prefix="nanoseek-sandbox-"))
        self.jobs = self.base / "jobs"
        for path in (self.base, self.base / "root", self.jobs):
            path.mkdir(exist_ok=True)
            path.chmod(0o711)  # the server, nobody when we are root, passes through to its job directories
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        fds = [str(request_r), str(answer_w)]
        self.pid_of_parent = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("_zygote.py")), level, str(self.base), *fds],
            pass_fds=(request_r, answer_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env={"PATH": os.defpath, "LANG": "C.UTF-8"},
            start_new_session=True,  # a Ctrl-C in the terminal is the trainer's, not the server's
        )
        os.close(request_r)
        os.close(answer_w)
        self._requests = os.fdopen(request_w, "w", buffering=1)
        answers = os.fdopen(answer_r)
        line = answers.readline() if select.select([answers], [], [], 30)[0] else None
        silent = "no answer in 30 s" if line is None else "it exited"
        hello = json.loads(line) if line else {"ready": False, "error": silent}
        if not hello["ready"]:
            self.close()
            raise SandboxError(f"the {level} sandbox did not start: {hello['error']}")
        self.uid = int(hello["uid"])  # whom the programs run as: their job directories must be theirs
        self._waiting: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.alive = True
        threading.Thread(target=self._read, args=(answers,), daemon=True).start()
        said = self._first_program()  # a program's own setup (namespaces, mounts) may fail where the server's did not
        if said != "ok":
            self.close()
            raise SandboxError(f"the {level} sandbox cannot run a program: {said}")

    def _first_program(self) -> str:
        """'ok' if `print('ok')` prints it, else the last line of what went wrong."""
        work = self.job_directory()
        try:
            (work / "main.py").write_text("print('ok')")
            (work / "stdin.txt").write_text("")
            answer = self.run(work, ExecLimits(timeout_s=10))
            said = _read(work / "stdout.txt", 100) + _read(work / "stderr.txt", 2000, tail=True)
            last = (said.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            return last if answer["returncode"] == 0 else f"{last} (exit {answer['returncode']})"
        except SandboxError as e:
            return str(e)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _read(self, answers: Any) -> None:
        for line in answers:
            message = json.loads(line)
            with self._lock:
                future = self._waiting.pop(message["id"], None)
            if future is not None:  # (None: its caller gave up waiting)
                future.set_result(message)
        with self._lock:  # the server exited: fail what waits on it
            self.alive = False
            waiting, self._waiting = list(self._waiting.values()), {}
        for future in waiting:
            future.set_exception(SandboxError("the code-execution server exited"))

    def job_directory(self) -> Path:
        work = Path(tempfile.mkdtemp(prefix="job-", dir=self.jobs))
        if self.uid != os.geteuid():
            os.chown(work, self.uid, self.uid)
        return work

    def run(self, directory: Path, limits: ExecLimits) -> dict[str, Any]:
        future: Future = Future()
        request = {
            "dir": str(directory),
            "timeout": limits.timeout_s,
            "limits": [limits.memory_mb << 20, limits.cpu_s, limits.output_bytes, limits.processes],
        }
        with self._lock:
            if not self.alive:
                raise SandboxError("the code-execution server exited")
            request["id"] = next(self._ids)
            self._waiting[request["id"]] = future
            try:
                self._requests.write(json.dumps(request) + "\n")
            except OSError as e:  # it exited between our check and the write
                del self._waiting[request["id"]]
                raise SandboxError(f"the code-execution server exited ({e})") from None
        try:
            return future.result(timeout=limits.timeout_s + 30)  # the server enforces timeout_s itself
        except FutureTimeout:
            with self._lock:
                self._waiting.pop(request["id"], None)
            raise SandboxError(f"no answer from the code-execution server in {limits.timeout_s + 30:.0f} s") from None

    def close(self) -> None:
        try:
            self._requests.close()  # end of requests: the server kills what still runs and exits
        except OSError:
            pass  # it had already exited
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)


_setting = "auto"
_server: _ForkServer | None = None
_refused: str | None = None  # why namespaces did not start here (asked once per setting)
_announced: str | None = None
_server_lock = threading.Lock()
_stats = SandboxStats(level=None)
_stats_lock = threading.Lock()
_logged: set[str] = set()


def configure_sandbox(level: str) -> None:
    """Choose the isolation level of the programs run from now on: 'auto', 'namespaces' or 'process'."""
    global _setting, _refused, _announced
    if level not in SANDBOX_LEVELS:
        raise ValueError(f"sandbox level {level!r}: must be one of {', '.join(SANDBOX_LEVELS)}")
    with _server_lock:
        if level != _setting:
            _setting, _refused, _announced = level, None, None
            _close_fork_server()


def _start_server() -> _ForkServer:
    """A server at the chosen level (auto: namespaces if they start, else process), said on stderr once."""
    global _refused, _announced
    level, why = _setting, ""
    if level == "auto" and os.environ.get("NANOSEEK_SANDBOX"):
        level, why = os.environ["NANOSEEK_SANDBOX"], " (NANOSEEK_SANDBOX)"
        if level not in SANDBOX_LEVELS:
            raise ValueError(f"NANOSEEK_SANDBOX={level!r}: must be one of {', '.join(SANDBOX_LEVELS)}")
    if level in ("auto", "namespaces") and _refused is None:
        try:
            server = _ForkServer("namespaces")
        except SandboxError as e:
            _refused = str(e)
        else:
            why = why or (" (auto: the strongest this machine allows)" if level == "auto" else "")
            level = "namespaces"
    if level == "namespaces" and _refused is not None:
        raise SandboxError(_refused)
    if level != "namespaces":
        why = why or (f" (auto: {_refused})" if level == "auto" else "")
        server = _ForkServer("process")
    if _announced != server.level:
        _announced = server.level
        print(f"nanoseek: code sandbox: {server.level}{why}", file=sys.stderr)
    with _stats_lock:
        _stats.level = server.level
    return server


def _fork_server() -> _ForkServer:
    """The process's fork server, started on first use and again if it died (or after a fork of this process)."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive or _server.pid_of_parent != os.getpid():
            if _server is not None and _server.pid_of_parent == os.getpid():
                _server.close()  # it died: reap it, remove its directory
            _server = _start_server()
        return _server


@atexit.register
def _close_fork_server() -> None:
    global _server
    if _server is not None and _server.pid_of_parent == os.getpid():
        _server.close()
    _server = None


def sandbox_level() -> str:
    """The level programs run at ('namespaces' or 'process'), starting the server if none runs.
    SandboxError if the level asked for cannot start here."""
    return _fork_server().level


def sandbox_stats() -> SandboxStats:
    """A snapshot of the counters of this process."""
    with _stats_lock:
        return replace(_stats)


def _sandbox_failure(detail: str) -> ExecResult:
    with _stats_lock:
        _stats.failures += 1
        first = detail not in _logged
        _logged.add(detail)
    if first:
        logger.warning("code sandbox failed: %s; the program scores 0 (logged once; sandbox_stats() counts)", detail)
    return ExecResult("sandbox_error", None, "", detail)


def _read(path: Path, limit: int, tail: bool = False) -> bytes:
    """At most `limit` bytes of a file the program may have replaced: never through a link, never a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        if tail and size > limit:
            f.seek(size - limit)
        return f.read(limit)


def run_python(source: str, stdin: str = "", limits: ExecLimits | None = None) -> ExecResult:
    """Run `source` as a fresh Python program (`__main__`, forked from a clean server) with `stdin` as its
    input, under `limits`, in its own job directory (removed after)."""
    limits = limits or ExecLimits()
    try:
        server = _fork_server()
        work = server.job_directory()
    except (SandboxError, OSError) as e:
        return _sandbox_failure(str(e))
    try:
        (work / "main.py").write_text(source, encoding="utf-8")
        (work / "stdin.txt").write_text(stdin, encoding="utf-8")
        try:
            answer = server.run(work, limits)
        except SandboxError as e:
            return _sandbox_failure(str(e))
        returncode = answer["returncode"]
        stdout = _read(work / "stdout.txt", limits.output_bytes or 1 << 30).decode("utf-8", errors="replace")
        stderr = _read(work / "stderr.txt", 4000, tail=True).decode("utf-8", errors="replace")[-2000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with _stats_lock:
        _stats.programs += 1
    if answer["timeout"]:
        status = "timeout"
    elif returncode == 0:
        status = "ok"
    elif returncode < 0:
        status = "killed"  # a signal: RLIMIT_CPU's SIGXCPU, or the program killed itself
    elif stderr.rstrip().endswith("MemoryError"):
        status = "memory_limit"
    elif "File too large" in stderr:  # Python ignores SIGXFSZ: writes past RLIMIT_FSIZE raise EFBIG
        status = "output_limit"
    else:
        status = "error"
    return ExecResult(status, returncode, stdout, stderr)
