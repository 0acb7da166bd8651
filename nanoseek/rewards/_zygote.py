"""The fork server behind `nanoseek.rewards.code.run_python` (run as `python -I _zygote.py REQ_FD RESP_FD`).

Starting a Python interpreter costs ~30 ms; forking this small, already started one costs ~1 ms. Each
request names a directory that holds `main.py` and `stdin.txt`; the server forks a child that makes
itself a new session (process group), points fds 0/1/2 at stdin.txt / stdout.txt / stderr.txt,
closes every other fd (so the program cannot reach this protocol), clears the environment, sets
the resource limits and runs main.py as `__main__`. The server reaps children as they exit, kills
a child's whole process group at its deadline (and at exit, for leftover grandchildren), and
answers with the exit code.

Protocol (JSON lines, both ways; nothing is unpickled): request
{"id": n, "dir": path, "timeout": s, "limits": [address_space, cpu_s, file_size]} (0 = no limit);
answer {"id": n, "returncode": int or null, "timeout": bool}. Standard library only, and no
import of nanoseek: `-I` keeps this directory off sys.path, so a program cannot import its siblings.
"""

import json
import os
import resource
import runpy
import select
import signal
import sys
import time
import traceback

_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
_LIMITS = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE")


def _child(directory: str, limits: list[int]) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.setsid()
        os.chdir(directory)
        for fd, name, flags in (
            (0, "stdin.txt", os.O_RDONLY),
            (1, "stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, "stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            opened = os.open(name, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(_ENV, HOME=directory, TMPDIR=directory)
        for name, value in zip(_LIMITS, limits):
            if value > 0 and hasattr(resource, name):
                try:
                    resource.setrlimit(getattr(resource, name), (value, value))
                except (ValueError, OSError):
                    pass  # e.g. RLIMIT_AS, which macOS does not support
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        sys.argv = ["main.py"]
        try:
            runpy.run_path("main.py", run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            code = code or 1
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def main(request_fd: int, answer_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C is the parent's to handle
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a child's exit wakes select() through wake_r
    running: dict[int, dict] = {}  # pid -> {"id", "deadline", "timeout"}
    pending = b""
    answers = os.fdopen(answer_fd, "w", buffering=1)

    def kill_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def answer(pid: int, returncode: int | None) -> None:
        job = running.pop(pid)
        kill_group(pid)  # whatever the program left running in its group
        answers.write(json.dumps({"id": job["id"], "returncode": returncode, "timeout": job["timeout"]}) + "\n")

    while True:
        now = time.monotonic()
        for pid, job in running.items():
            if not job["timeout"] and now >= job["deadline"]:
                job["timeout"] = True
                kill_group(pid)
        while running:  # reap
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in running:
                answer(pid, None if running[pid]["timeout"] else os.waitstatus_to_exitcode(status))
        waits = [job["deadline"] - now for job in running.values() if not job["timeout"]]
        ready, _, _ = select.select([request_fd, wake_r], [], [], max(0.0, min(waits)) if waits else None)
        if wake_r in ready:
            os.read(wake_r, 4096)
        if request_fd in ready:
            chunk = os.read(request_fd, 1 << 16)
            if not chunk:  # the parent is gone: kill what still runs and leave
                for pid in running:
                    kill_group(pid)
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request["dir"], request["limits"])
                running[pid] = {
                    "id": request["id"],
                    "deadline": time.monotonic() + request["timeout"],
                    "timeout": False,
                }


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
