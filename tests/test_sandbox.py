"""Probes of the code sandbox: hostile programs, run through `run_python` and `check_code` at each level.

Each probe asserts what the README's "Code sandbox" table claims for its level (`CLAIMS` below is
that table, and a test checks that the README says the same): "contained" probes must be stopped;
"not contained" ones are shown to get through where that is safe to show, and otherwise (a fork bomb,
a socket to a public address under `process`) not run at all. The `namespaces` tests skip, saying
why, where the kernel or the container refuses unprivileged namespaces. References: the host's own
view (what this process reads, the process table, a listener it opens), never the program's word.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from processes import running_with

from nanoseek.rewards import check_code, sandbox
from nanoseek.rewards.sandbox import ExecLimits, SandboxError, configure_sandbox, run_python, sandbox_stats

REPO = Path(__file__).resolve().parents[1]

# probe -> (under namespaces, under process): the README's table, word for word in its first column.
CLAIMS = {
    "read /etc/passwd, /root, the repository, another user's file": ("contained", "not contained"),
    "read the trainer's environment (/proc/PID/environ)": ("contained", "not contained"),
    "find the trainer's variables in its own environment": ("contained", "contained"),
    "write into /tmp or the real home directory": ("contained", "not contained"),
    "leave files through $HOME or $TMPDIR": ("contained", "contained"),
    "write outside its directory through a symlink": ("contained", "not contained"),
    "make the trainer read through a symlink, or block on a FIFO": ("contained", "contained"),
    "talk to a listener on the trainer's 127.0.0.1": ("contained", "not contained"),
    "open a socket to a public address": ("contained", "not contained"),
    "ptrace its parent or the trainer": ("contained", "not contained"),
    "hold capabilities, make namespaces of its own (unshare)": ("contained", "not contained"),
    "leave a setsid() child running": ("contained", "contained"),
    "leave a double-forked daemon running": ("contained", "contained"),
    "fork bomb": ("contained", "not contained"),
    "allocate 10 GB": ("contained", "contained"),
    "print forever": ("contained", "contained"),
    "sleep forever": ("contained", "contained"),
    "kill the sandbox server mid-call": ("contained", "partly"),
}
LEVELS = ("namespaces", "process")


@pytest.fixture(params=LEVELS)
def level(request):
    """Run the test at one level; skip where this machine refuses it."""
    configure_sandbox(request.param)
    try:
        got = sandbox.sandbox_level()
    except SandboxError as e:
        configure_sandbox("auto")
        pytest.skip(f"unprivileged user namespaces are refused here: {e}")
    assert got == request.param
    yield request.param
    configure_sandbox("auto")


def claim(probe: str, level: str) -> str:
    return CLAIMS[probe][LEVELS.index(level)]


def run_json(source: str, **limits) -> dict:
    """Run a probe that prints one JSON object; its result."""
    result = run_python(source, limits=ExecLimits(**limits) if limits else None)
    assert result.status == "ok", result.stderr
    return json.loads(result.stdout)


TRY = """
import json, os, socket, sys
def attempt(f):
    try:
        return f()
    except Exception as e:
        return type(e).__name__
"""


def host_view(expression) -> object:
    try:
        return expression()
    except Exception as e:
        return type(e).__name__


def sleeper(token: str, seconds: int = 60) -> str:
    """Source of an argv list: a Python that sleeps, named by `token` in the process table."""
    return f"[sys.executable, '-c', 'import time; time.sleep({seconds})', {token!r}]"


@pytest.fixture
def token() -> str:
    return f"nanoseek-probe-{os.getpid()}-{time.time_ns()}"


# ----------------------------------------------------------------------------- the README says the same
def test_readme_states_the_claims_the_probes_check() -> None:
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (.+?) \|$", text, re.MULTILINE)
    table = {probe.replace("`", ""): (ns, proc) for probe, ns, proc in rows if probe.replace("`", "") in CLAIMS}
    assert set(table) == set(CLAIMS)
    for probe, (ns, proc) in table.items():
        assert ns.startswith(CLAIMS[probe][0]) and proc.startswith(CLAIMS[probe][1]), probe


# ----------------------------------------------------------------------------- reading
def test_reading_the_hosts_files(level, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("another user's secret")
    secret.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(secret, 12345, 12345)  # another user's file (root reads it anyway)
    paths = ["/etc/passwd", str(secret), str(REPO / "README.md"), str(REPO / "nanoseek" / "config.py")]
    probe = TRY + f"print(json.dumps([attempt(lambda: open(p).read()) for p in {paths!r}]"
    probe += " + [attempt(lambda: sorted(os.listdir('/root'))), os.getcwd(), sorted(os.listdir('..'))]))"
    with ThreadPoolExecutor(1) as pool:  # another program's job directory exists meanwhile
        other = pool.submit(run_python, "import time\ntime.sleep(2)")
        time.sleep(0.5)
        *got, cwd, jobs = run_json(probe)
        host = [host_view(lambda p=p: open(p).read()) for p in paths] + [host_view(lambda: sorted(os.listdir("/root")))]
        others = os.listdir(Path(cwd).parent)  # the other's, still running (the probe's is removed)
        assert other.result().status == "ok"
    assert len(others) == 1 and others[0] != Path(cwd).name
    if claim("read /etc/passwd, /root, the repository, another user's file", level) == "not contained":
        assert got == host and jobs == sorted([*others, Path(cwd).name])  # what the trainer's user reads
        return
    assert jobs == [Path(cwd).name]  # no other program's directory
    assert got[0] != host[0] and "root:" not in got[0]  # the view's own /etc/passwd
    assert got[1:4] == ["FileNotFoundError"] * 3
    python_homes = {Path(p).resolve().parts[2] for p in (sys.prefix, sys.base_prefix) if p.startswith("/root/")}
    assert got[4] == "FileNotFoundError" or set(got[4]) <= python_homes  # at most the way to the interpreter


def test_reading_the_trainers_environment(level, monkeypatch, token) -> None:
    monkeypatch.setenv("NANOSEEK_PROBE_SECRET", token)  # in this (the trainer's) environment
    stand_in = subprocess.Popen(  # a trainer with the secret in its environment since exec
        [sys.executable, "-c", "import time; time.sleep(60)"], env={"NANOSEEK_PROBE_SECRET": token}
    )
    try:
        time.sleep(0.2)
        pids = [os.getpid(), stand_in.pid]
        probe = TRY + "print(json.dumps([attempt(lambda: open(f'/proc/{p}/environ', 'rb').read().decode()) "
        probe += f"for p in {pids!r}] + [dict(os.environ)]))"
        mine, stand_ins, own = run_json(probe)
    finally:
        stand_in.kill()
        stand_in.wait()
    assert token not in json.dumps(own) and set(own) <= {"PATH", "LANG", "OMP_NUM_THREADS", "HOME", "TMPDIR"}
    assert claim("find the trainer's variables in its own environment", level) == "contained"
    environ = Path(f"/proc/{os.getpid()}/environ").read_bytes().decode()
    if claim("read the trainer's environment (/proc/PID/environ)", level) == "not contained":
        assert token in stand_ins and mine == environ
    else:
        assert token not in stand_ins and mine != environ


# ----------------------------------------------------------------------------- writing
def test_writing_outside_its_directory(level, tmp_path, token) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # writable by whoever the program runs as: only the sandbox may stop it
    targets = {
        "tmp": Path("/tmp") / token,
        "real_home": Path.home() / token,
        "through_symlink": outside / "through-symlink.txt",
    }
    probe = TRY + f"targets = {json.dumps({k: str(v) for k, v in targets.items()})}\n"
    probe += f"""
os.symlink(targets["through_symlink"], "link")
got = {{name: attempt(lambda: open("link" if name == "through_symlink" else path, "w").write("x"))
        for name, path in targets.items()}}
for name in ("HOME", "TMPDIR"):
    got[name] = attempt(lambda: open(os.path.join(os.environ[name], name + "-{token}"), "w").write("x"))
got["home_dir"] = os.path.expanduser("~")
print(json.dumps(got))
"""
    try:
        got = run_json(probe)
        written = {name: path.exists() for name, path in targets.items()}
    finally:
        for path in targets.values():
            path.unlink(missing_ok=True)
    assert got["HOME"] == got["TMPDIR"] == 1  # both written, into the job directory, which is gone
    assert not Path(got["home_dir"]).exists()
    assert claim("leave files through $HOME or $TMPDIR", level) == "contained"
    writes = claim("write into /tmp or the real home directory", level)
    symlink = claim("write outside its directory through a symlink", level)
    assert written == {
        "tmp": writes == "not contained",
        "real_home": writes == "not contained" and os.access(Path.home(), os.W_OK),
        "through_symlink": symlink == "not contained",
    }


def test_the_trainer_reads_no_link_and_waits_on_no_fifo(level, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the trainer's secret")
    probe = f"import os\nos.remove('stdout.txt')\nos.symlink({str(secret)!r}, 'stdout.txt')\n"
    probe += "os.remove('stderr.txt')\nos.mkfifo('stderr.txt')\n"
    t0 = time.monotonic()
    result = run_python(probe)
    assert claim("make the trainer read through a symlink, or block on a FIFO", level) == "contained"
    assert (result.status, result.stdout, result.stderr) == ("ok", "", "") and time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- network
def test_sockets(level, token) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        attempts = [
            f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall({token.encode()!r})",
            "socket.socket().bind(('127.0.0.1', 0))",  # the loopback of its own namespace works
        ]
        if claim("open a socket to a public address", level) == "contained":  # run only where nothing leaves
            attempts.append("socket.create_connection(('192.0.2.1', 80), timeout=1)")  # TEST-NET-1
        got = run_json(TRY + "print(json.dumps([" + ", ".join(f"attempt(lambda: {a})" for a in attempts) + "]))")
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(1)
                heard = connection.recv(100).decode()
        except TimeoutError:
            heard = ""
    assert got[1] is None
    if claim("talk to a listener on the trainer's 127.0.0.1", level) == "not contained":
        assert heard == token and got[0] is None
    else:
        assert heard == "" and got[0] == "ConnectionRefusedError"
    if len(got) == 3:
        assert got[2] == "OSError"  # Network is unreachable: the namespace has no route at all


# ----------------------------------------------------------------------------- processes
PTRACE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def seize(pid):  # PTRACE_SEIZE does not stop the tracee; detach at once
    if libc.ptrace(0x4206, pid, None, None) == 0:
        libc.ptrace(17, pid, None, None)
        return "attached"
    return os.strerror(ctypes.get_errno())
capabilities = int(open("/proc/self/status").read().split("CapEff:")[1].split()[0], 16)
seized = [seize(os.getppid()), seize(TRAINER)]
print(json.dumps(seized + [capabilities, libc.unshare(0x10000000) == 0]))  # CLONE_NEWUSER: the others follow
"""


def test_ptrace_and_namespaces_of_its_own(level) -> None:
    parent, trainer, capabilities, unshared = run_json(PTRACE.replace("TRAINER", str(os.getpid())))
    if claim("ptrace its parent or the trainer", level) == "not contained":
        assert (parent, trainer) == ("attached", "attached") or os.geteuid() != 0
    else:
        assert parent != "attached" and trainer != "attached"
    if claim("hold capabilities, make namespaces of its own (unshare)", level) == "contained":
        assert capabilities == 0 and not unshared
    else:  # root's capabilities, or an unprivileged user's right to a user namespace
        assert unshared and (capabilities != 0 or os.geteuid() != 0)


def test_processes_it_leaves_behind_die(level, token) -> None:
    setsid_child = f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, {sleeper(token)})
"""
    daemon = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, {sleeper(token + "-d")})
    os._exit(0)
time.sleep(0.5)
"""
    for source in (setsid_child, daemon):
        result = run_python(source)
        assert result.status == "ok", result.stderr
    assert running_with(token, wait_s=5) == []  # (the daemon's token holds the child's)
    assert claim("leave a setsid() child running", level) == claim("leave a double-forked daemon running", level)
    assert claim("leave a setsid() child running", level) == "contained"


def test_sleep_forever_and_print_forever_and_allocate_10_gb(level, token) -> None:
    t0 = time.monotonic()
    source = f"import subprocess, sys, time\nsubprocess.Popen({sleeper(token)})\ntime.sleep(10**6)"
    forever = run_python(source, limits=ExecLimits(timeout_s=1))
    assert forever.status == "timeout" and time.monotonic() - t0 < 10 and running_with(token, wait_s=5) == []
    flood = run_python("while True: print('x' * 1000)", limits=ExecLimits(output_bytes=10_000))
    assert flood.status == "output_limit" and len(flood.stdout) <= 10_000
    assert run_python("x = bytearray(10 << 30)").status == "memory_limit"
    for probe in ("sleep forever", "print forever", "allocate 10 GB"):
        assert claim(probe, level) == "contained"


def test_fork_bomb(level) -> None:
    if claim("fork bomb", level) == "not contained":
        pytest.skip("not run under process: nothing bounds it before the wall clock (the README says so)")
    bomb = """
import os, time
forks = 0
try:
    while True:  # each child sleeps: they add up
        if os.fork() == 0:
            time.sleep(60)
        forks += 1
except OSError:
    print(forks, flush=True)
time.sleep(60)
"""
    t0 = time.monotonic()
    result = run_python(bomb, limits=ExecLimits(timeout_s=3, processes=50))
    assert result.status == "timeout" and time.monotonic() - t0 < 15
    assert 0 < int(result.stdout) < 50  # refused at the bound (the server's own processes count too)
    server = sandbox._fork_server()
    assert running_with(str(server.base), wait_s=5, but=server.process.pid) == []  # only the server is left


def test_server_killed_mid_call_scores_0_and_counts(level, token) -> None:
    row = {"tests": ["assert True"]}
    completion = f"```python\nimport subprocess, sys, time\nsubprocess.Popen({sleeper(token)})\ntime.sleep(60)\n```"
    server = sandbox._fork_server()
    failures = sandbox_stats().failures
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(check_code, completion, row, ExecLimits(timeout_s=30))
        deadline = time.monotonic() + 10
        while not running_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.kill()
        result = stuck.result(timeout=10)
    assert (result.passed, result.status) == (False, "sandbox_error") and sandbox_stats().failures == failures + 1
    assert running_with(str(server.base), wait_s=5) == []  # the program itself (a fork of the server) died
    if claim("kill the sandbox server mid-call", level) == "contained":
        assert running_with(token, wait_s=5) == []  # and what it started
    else:
        (started,) = running_with(token)  # what it started did not
        os.kill(started, 9)
    assert check_code("```python\nprint(1)\n```", row).passed  # the next call starts a new server


# ----------------------------------------------------------------------------- the setting
def test_the_setting_is_checked_and_reaches_the_runner(monkeypatch, capsys) -> None:
    from nanoseek.config_toml import load_run_config

    with pytest.raises(ValueError, match=r"rewards.sandbox = 'jail': must be one of auto, namespaces, process"):
        load_run_config(overrides=["rewards.sandbox=jail"])
    assert load_run_config(overrides=["rewards.sandbox=process"]).rewards.sandbox == "process"
    with pytest.raises(ValueError, match="sandbox level 'jail'"):
        configure_sandbox("jail")
    monkeypatch.setenv("NANOSEEK_SANDBOX", "process")  # stands in for auto, not for an explicit level
    configure_sandbox("auto")
    try:
        assert sandbox.sandbox_level() == "process" and run_python("print(1)").stdout == "1\n"
        assert "code sandbox: process (NANOSEEK_SANDBOX)" in capsys.readouterr().err
    finally:
        configure_sandbox("process")
        configure_sandbox("auto")


def test_refused_namespaces_score_0_and_auto_falls_back(monkeypatch, capsys) -> None:
    class Refused(sandbox._ForkServer):  # a machine whose kernel or container refuses them
        def __init__(self, level: str) -> None:
            if level == "namespaces":
                raise SandboxError("the namespaces sandbox did not start: unshare: Operation not permitted (simulated)")
            super().__init__(level)

    monkeypatch.setattr(sandbox, "_ForkServer", Refused)
    monkeypatch.delenv("NANOSEEK_SANDBOX", raising=False)
    configure_sandbox("process")
    configure_sandbox("namespaces")
    try:
        failures = sandbox_stats().failures
        result = run_python("print(1)")
        assert (result.status, result.returncode) == ("sandbox_error", None) and "simulated" in result.stderr
        graded = check_code("```python\ndef add(a, b):\n    return a + b\n```", {"tests": ["assert add(1, 2) == 3"]})
        assert (graded.passed, graded.status) == (False, "sandbox_error")
        assert sandbox_stats().failures == failures + 2
        with pytest.raises(SandboxError, match="simulated"):
            sandbox.sandbox_level()
        configure_sandbox("auto")
        assert run_python("print(1)").stdout == "1\n" and sandbox.sandbox_level() == "process"
        assert "code sandbox: process (auto: the namespaces sandbox did not start" in capsys.readouterr().err
    finally:
        configure_sandbox("process")
        configure_sandbox("auto")
