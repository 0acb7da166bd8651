"""The fork server behind `nanoseek.rewards.sandbox.run_python` (`python -I _zygote.py LEVEL BASE REQ_FD RESP_FD`).

Starting a Python interpreter costs ~30 ms; forking this small, already started one costs ~1 ms. Each
request names a job directory (under BASE/jobs) that holds `main.py` and `stdin.txt`; the server forks
a child that points fds 0/1/2 at stdin.txt / stdout.txt / stderr.txt, closes every other fd (so the
program cannot reach this protocol), empties the environment (PATH, LANG, and HOME = TMPDIR = the job
directory), sets the resource limits and runs main.py as `__main__`. The server reaps children as they
exit, kills what a program left behind, kills a program at its deadline, and answers with the exit code.

LEVEL `process`: the child makes itself a new session; at the end the server kills that process group
and, being a child subreaper, every process that outlived its parent (a `setsid` or double-fork
escape is re-parented to this server, which kills it when the next program ends).

LEVEL `namespaces` (Linux): at start the server enters new user, mount, UTS, IPC and network
namespaces (started by root, it has a helper map `nobody` and becomes nobody, so programs are nobody
outside), forbids nested user namespaces in its own, and pivots into a new root (a tmpfs on
BASE/root) holding read-only binds of the system directories and the Python installation, a stub
/etc, /dev/null & co., BASE/jobs, and the host's /proc (which it alone sees). Per program: the child
C enters new mount, PID, IPC and network namespaces (loopback only), hides every job directory but
its own (the one writable place), mounts a small tmpfs on /dev/shm and forks G, PID 1 of the new
PID namespace, which mounts the namespace's /proc over the host's, drops every capability, sets
no_new_privs and forks the program P. When P exits, G reports its status to C (which exits the same
way) and exits, and the kernel kills everything left in the PID namespace, `setsid` or not. C and G
die with their parent (PR_SET_PDEATHSIG), so killing this server kills every program it runs.

Protocol (JSON lines, both ways; nothing is unpickled): first answer {"ready": true, "uid": n} (the
user id programs run as, outside) or {"ready": false, "error": text}; then request
{"id": n, "dir": path, "timeout": s, "limits": [address_space, cpu_s, file_size, processes]} (0 = no
limit); answer {"id": n, "returncode": int or null, "timeout": bool}. Standard library only, and no
import of nanoseek: `-I` keeps this directory off sys.path, so a program cannot import its siblings.
"""

import ctypes
import fcntl
import gc
import json
import os
import pkgutil  # noqa: F401  (runpy.run_path imports it on first use: here once, not in every program)
import resource
import runpy
import select
import signal
import socket
import struct
import sys
import time
import traceback

_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
_LIMITS = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC")
_LINUX = sys.platform.startswith("linux")
_NOBODY = 65534  # who programs run as (outside the namespaces) when the server is started by root
_libc = ctypes.CDLL(None, use_errno=True)

# <linux/sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>, <linux/sockios.h>
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1
_RO = MS_RDONLY | MS_NOSUID | MS_NODEV
_ST_TO_MS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC}
_ST_TO_MS |= {os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")  # bound read-only (or re-linked)
_DEVICES = ("null", "zero", "full", "random", "urandom")
_ETC = {  # the view's /etc: no host accounts, names or secrets ({uid}/{gid}: the programs' ids)
    "passwd": "sandbox:x:{uid}:{gid}:sandbox:/nonexistent:/usr/sbin/nologin\n",
    "group": "sandbox:x:{gid}:\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}
_JOB = "/.job"  # where C parks its job directory while it covers the others


# ----------------------------------------------------------------------------- Linux calls
def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _pivot_root(new_root: bytes, put_old: bytes) -> int:
    if hasattr(_libc, "pivot_root"):  # glibc >= 2.34
        return _libc.pivot_root(new_root, put_old)
    number = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(os.uname().machine)
    if number is None:
        raise OSError(f"pivot_root: no syscall number for {os.uname().machine}")
    return _libc.syscall(number, new_root, put_old)


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def c(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    _check(_libc.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data)), f"mount {target}")


def _bind(source: str, target: str, flags: int) -> None:
    """Bind `source` at `target` with per-mount `flags` (a bind ignores flags until remounted), keeping the
    source's own flags: a remount that cleared one the host set would be refused (it is locked)."""
    _mount(source, target, None, MS_BIND)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | flags | _flags_of(os.statvfs(target).f_flag))


def _flags_of(f: int) -> int:
    """statvfs's f_flag as MS_ bits (atime: strict unless noatime or relatime)."""
    flags = sum(ms for st, ms in _ST_TO_MS.items() if f & st)
    return flags if f & (os.ST_NOATIME | os.ST_RELATIME) else flags | MS_STRICTATIME


def _drop_privileges() -> None:
    """No capability in any set, none to regain by exec (no_new_privs)."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            break  # past CAP_LAST_CAP
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(_libc.capset(ctypes.c_char_p(header), ctypes.create_string_buffer(24)), "capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL when the parent dies; and at once if it already has (`parent` None: cannot be checked)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


# ----------------------------------------------------------------------------- the namespaces level, set up once
def _makedirs(root: str, path: str) -> str:
    inside = root + path
    os.makedirs(inside, exist_ok=True)
    return inside


def _open_sources() -> list[tuple[str, int | str]]:
    """What the view shows of the host, opened while this process is still the caller's user (the Python
    installation may sit in /root, which nobody cannot enter): (path, O_PATH fd), or (path, target) for a
    symlink."""
    python = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths = list(_SYSTEM) + [p for p in sorted(python) if not any(p.startswith(s + "/") for s in _SYSTEM)]
    sources: list[tuple[str, int | str]] = []
    for path in [*paths, "/etc/ld.so.cache", "/etc/localtime", *(f"/dev/{name}" for name in _DEVICES)]:
        if os.path.islink(path):
            sources.append((path, os.readlink(path)))
        elif os.path.exists(path):
            sources.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
    return sources


def _expose(root: str, path: str, source: int | str) -> None:
    """Show host `path` read-only under `root`: a symlink as a symlink, else a bind of the fd `source`."""
    if isinstance(source, str):
        os.makedirs(root + os.path.dirname(path), exist_ok=True)
        os.symlink(source, root + path)
        return
    if os.path.isdir(f"/proc/self/fd/{source}"):
        _makedirs(root, path)
    else:
        os.makedirs(root + os.path.dirname(path), exist_ok=True)
        open(root + path, "w").close()
    _bind(f"/proc/self/fd/{source}", root + path, _RO if not path.startswith("/dev/") else MS_NOSUID | MS_NOEXEC)
    os.close(source)


def _write_maps(pid: str, uid: int, gid: int) -> None:
    """Map `uid`/`gid` to themselves, the only ids of the new user namespace of process `pid`."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def _unshare_mapping_nobody(flags: int) -> None:
    """As root: unshare `flags` and have a helper left outside map nobody, the one id inside (mapping an id
    not one's own takes CAP_SETUID where the namespace was made)."""
    os.setgroups([])
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(go_w)
            if os.read(go_r, 1):
                _write_maps(str(os.getppid()), _NOBODY, _NOBODY)
                code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    try:
        _unshare(flags)
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise OSError("the helper could not write the user namespace's uid and gid maps")


def _enter_namespaces(base: str) -> int:
    """Leave the caller's namespaces and pivot into the view described in the docstring; the programs' uid."""
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET
    root_outside = os.geteuid() == 0
    if root_outside:  # programs must not be root outside: they are nobody
        _unshare_mapping_nobody(flags)
    else:
        uid, gid = os.geteuid(), os.getegid()
        _unshare(flags)
        _write_maps("self", uid, gid)  # one's own ids: no privilege needed
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
    sources = _open_sources()  # in this mount namespace (a bind takes its source from the caller's)
    if root_outside:  # the namespace's capabilities stay: its uid 0 is not mapped, so this leaves no root
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)
        _prctl(PR_SET_DUMPABLE, 1)  # the change of uid cleared it, which would make /proc/self/fd root's
    uid, gid = os.geteuid(), os.getegid()
    with open("/proc/sys/user/max_user_namespaces", "w") as f:  # this namespace's own limit: no program
        f.write("0")  # nests a user namespace of its own (in which it would hold every capability)
    root = os.path.join(base, "root")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, source in sources:
        _expose(root, path, source)
    for name, text in _ETC.items():
        with open(_makedirs(root, "/etc") + "/" + name, "w") as f:
            f.write(text.format(uid=uid, gid=gid))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    for path in ("/dev/shm", _JOB):
        _makedirs(root, path)
    # The host's /proc, for this server only: the kernel mounts a new proc only where one is fully visible
    # already. Each program's G mounts its own over it, and P, without capabilities, cannot unmount that.
    _mount("/proc", _makedirs(root, "/proc"), None, MS_BIND)
    _bind(os.path.join(base, "jobs"), _makedirs(root, os.path.join(base, "jobs")), MS_NOSUID | MS_NODEV)
    os.chdir(root)
    _check(_pivot_root(b".", b"."), "pivot_root")  # the old root is stacked under the new one ...
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # ... and detached: no way back to it
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | _RO)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    return uid


# ----------------------------------------------------------------------------- a program
def _open_stdio(directory: str) -> None:
    """fds 0/1/2 on the job's files; every other fd closed."""
    os.chdir(directory)
    for fd, name, flags in (
        (0, "stdin.txt", os.O_RDONLY),
        (1, "stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, "stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(name, flags | os.O_NOFOLLOW, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    signal.set_wakeup_fd(-1)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)


def _run_program(directory: str, limits: list[int]) -> None:
    """In the program's process: environment, limits, then main.py as `__main__`. Never returns."""
    code = 1
    try:
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


def _process_child(directory: str, limits: list[int], server: int) -> None:
    """LEVEL process, in the forked child: a session of its own, dies with the server. Never returns."""
    try:
        os.setsid()
        if _LINUX:
            _die_with_parent(server)
        _open_stdio(directory)
    except BaseException:
        os._exit(1)
    _run_program(directory, limits[:3])  # no RLIMIT_NPROC: it counts every process of this user, the trainer's too


def _namespaced_child(directory: str, limits: list[int], server: int) -> None:
    """LEVEL namespaces, in C (see the module docstring). Never returns."""
    try:
        _die_with_parent(server)
        os.setsid()  # the server kills C's group at the deadline: C and G (P has a session of its own)
        _open_stdio(directory)  # first: what goes wrong below is the program's stderr
        _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bring the loopback up
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP))
        jobs = os.path.dirname(directory)
        _mount(directory, _JOB, None, MS_BIND)
        _mount("tmpfs", jobs, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4k,nr_inodes=4")
        os.mkdir(directory)
        _mount(_JOB, directory, None, MS_MOVE)  # the other jobs stay under the tmpfs
        _mount(None, jobs, None, MS_REMOUNT | MS_BIND | MS_NOEXEC | _RO)
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=64m")
        os.chdir(directory)  # the job directory as moved above the others
        mine, its = socket.socketpair()
        init = os.fork()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if init == 0:
        mine.close()
        _init(directory, limits, its)
    its.close()
    status = mine.makefile("rb").read()  # G's report of P's wait status, then EOF
    os.waitpid(init, 0)
    if not status:
        os._exit(1)  # G died without reporting
    status = int(status)
    if os.WIFSIGNALED(status):  # die the way P died, so the server sees P's status
        if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _init(directory: str, limits: list[int], parent: socket.socket) -> None:
    """G, PID 1 of the program's PID namespace: /proc, no privileges, then P; reports P's status. Never returns."""
    try:
        _die_with_parent(None)
        if select.select([parent], [], [], 0)[0]:  # EOF: C died before PDEATHSIG was set
            os._exit(1)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # over the host's
        _drop_privileges()
        _prctl(PR_SET_DUMPABLE, 0)  # P may not ptrace G nor open its /proc files
        program = os.fork()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if program == 0:
        try:
            parent.close()
            _prctl(PR_SET_DUMPABLE, 1)
            os.setsid()
        except BaseException:
            os._exit(1)
        _run_program(directory, limits)
    while True:  # as PID 1, reap every orphan of the namespace until P itself exits
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            break
    try:
        parent.sendall(str(status).encode())
    finally:
        os._exit(0)  # the kernel kills what P left running in the namespace


# ----------------------------------------------------------------------------- the server
def _children() -> list[int]:
    """This (single-threaded) server's child processes."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


def _session(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])  # state ppid pgrp session ...
    except (OSError, IndexError, ValueError):
        return None


def _kill_orphans(running: dict[int, dict]) -> None:
    """LEVEL process: kill the processes re-parented to this subreaper that no running program's session
    holds (they outlived the program that started them), and then their children, which come to us."""
    for _ in range(100):
        orphans = [pid for pid in _children() if pid not in running and _session(pid) not in running]
        if not orphans:
            return
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def main(level: str, base: str, request_fd: int, answer_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C is the parent's to handle
    answers = os.fdopen(answer_fd, "w", buffering=1)
    try:
        if level == "namespaces":
            uid = _enter_namespaces(base)
        elif level == "process":
            uid = os.geteuid()
            if _LINUX:
                _prctl(PR_SET_CHILD_SUBREAPER, 1)
        else:
            raise ValueError(f"unknown level {level!r}")
    except Exception as e:
        answers.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    answers.write(json.dumps({"ready": True, "uid": uid}) + "\n")
    gc.freeze()  # a program's collections leave the server's objects (and their shared pages) alone
    child = _namespaced_child if level == "namespaces" else _process_child
    sweep = level == "process" and _LINUX
    server = os.getpid()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a child's exit wakes select() through wake_r
    running: dict[int, dict] = {}  # pid -> {"id", "deadline", "timeout"}
    pending = b""

    def kill_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def answer(pid: int, returncode: int | None) -> None:
        job = running.pop(pid)
        kill_group(pid)  # whatever the program left running in its group
        if sweep:
            _kill_orphans(running)
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
                if sweep:
                    running.clear()
                    _kill_orphans(running)
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    child(request["dir"], request["limits"], server)
                deadline = time.monotonic() + request["timeout"]
                running[pid] = {"id": request["id"], "deadline": deadline, "timeout": False}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
