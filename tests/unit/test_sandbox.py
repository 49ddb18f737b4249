"""The sandbox for model-written code: hostile programs are contained and scored as failures and
this process (the worker) stays healthy; HumanEval's canonical solutions pass, broken ones fail."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantpipe.errors import PipelineError
from quantpipe.validation.humaneval import load_problems, pass_at_1, program, run_completions, score_completions
from quantpipe.validation.sandbox import SandboxLimits, SandboxUnavailable, run_python, sandbox_available

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs a root worker (namespaces, setuid)")

REPO = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=2.5, hidden_paths=(REPO,))


def uid_processes(uid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and any(ln.startswith("Uid:") and str(uid) in ln.split()[1:]
                                        for ln in (d / "status").read_text().splitlines()):
                found.append(int(d.name))
        except OSError:
            pass
    return found


def contained(code: str, limits: SandboxLimits = LIMITS):
    """Run hostile ``code``: it must fail, leave no process behind, and the next program must still pass."""
    r = run_python(code, limits)
    assert not r.passed, r
    assert uid_processes(r.uid) == [] and r.strays_killed == 0, "a process of the sandbox outlived its run"
    ok = run_python("assert sum(range(5)) == 10\nprint('healthy')", limits)
    assert ok.passed and ok.stdout_tail == "healthy\n", ok
    return r


def test_the_host_offers_the_full_isolation():
    desc = sandbox_available()
    assert desc is not None and "network, PID, mount" in desc and "read-only filesystem" in desc


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    good = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n", LIMITS)
    assert good.passed and good.exit_code == 0 and good.stdout_tail == "ok\n" and good.reason == "passed"
    bad = run_python("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", LIMITS)
    assert not bad.passed and bad.exit_code == 1 and "AssertionError" in bad.reason
    assert "AssertionError" in bad.stderr_tail and not bad.timed_out


def test_its_own_folder_is_writable():
    r = run_python("import os, tempfile\nopen('a.txt', 'w').write('x')\n"
                   "with tempfile.NamedTemporaryFile() as f: f.write(b'y')\nprint(sorted(os.listdir('.')))", LIMITS)
    assert r.passed and "'a.txt'" in r.stdout_tail, r


def test_a_fork_bomb_hits_the_process_limit_and_is_killed():
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
            "            while True:\n                try:\n                    os.fork()\n"
            "                except OSError:\n                    time.sleep(0.01)\n        n += 1\n"
            "except OSError as e:\n    print('forks', n, type(e).__name__, flush=True)\nwhile True:\n    pass\n")
    r = contained(code, SandboxLimits(cpu_seconds=30, wall_seconds=2, hidden_paths=(REPO,)))
    assert r.timed_out and "wall-clock" in r.reason
    assert r.stdout_tail.startswith("forks") and "BlockingIOError" in r.stdout_tail
    assert int(r.stdout_tail.split()[1]) < LIMITS.max_procs


def test_an_endless_loop_is_killed_at_the_wall_clock_limit():
    r = contained("while True:\n    pass\n", SandboxLimits(cpu_seconds=30, wall_seconds=1.5))
    assert r.timed_out and r.signal == 9 and r.seconds < 1.5 + 1.0


def test_cpu_time_is_limited_even_when_sigxcpu_is_ignored():
    r = contained("while True:\n    pass\n", SandboxLimits(cpu_seconds=1, wall_seconds=10))
    assert not r.timed_out and r.signal == 24 and "CPU time limit" in r.reason
    r = contained("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
                  SandboxLimits(cpu_seconds=1, wall_seconds=10))
    assert not r.timed_out and r.signal == 9 and r.seconds < 5


@pytest.mark.parametrize("code", ["x = bytearray(8 * 1024 ** 3)\n", "x = [0] * 10 ** 9\n"])
def test_a_huge_allocation_fails(code):
    r = contained(code)
    assert "MemoryError" in r.reason and "address-space limit" in r.reason


def test_file_size_and_output_are_limited():
    r = contained("open('big', 'wb').write(b'x' * (64 << 20))\n")
    assert "File too large" in r.reason
    r = contained("import sys\nsys.stdout.write('y' * (64 << 20))\nsys.stdout.flush()\n")
    assert len(r.stdout_tail) == LIMITS.output_chars and set(r.stdout_tail) == {"y"}


def test_writes_outside_its_folder_fail_and_leave_nothing(tmp_path):
    name = f"quantpipe-canary-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / name, Path("/var/tmp") / name, Path("/dev/shm") / name, REPO / name, tmp_path / name]
    for target in targets:
        r = contained(f"def f():\n    open({str(target)!r}, 'w').write('escaped')\n    return 1\n\nassert f() == 1\n")
        assert "Error" in r.reason, r
        assert not target.exists(), f"the sandbox wrote {target}"
    r = contained("import os\nopen(os.path.join('..', 'escaped'), 'w').write('x')\n")
    assert "Permission denied" in r.reason or "Read-only" in r.reason


def test_root_only_files_and_hidden_folders_cannot_be_read(tmp_path):
    store = tmp_path / "store"  # stands in for the artifact store: root-owned, 0700
    store.mkdir(mode=0o700)
    secret = store / "model.safetensors"
    secret.write_text("store-secret")
    secret.chmod(0o644)  # only the folder's mode protects it
    assert store.stat().st_uid == 0 and stat.S_IMODE(store.stat().st_mode) == 0o700
    r = contained(f"assert open({str(secret)!r}).read() == 'store-secret'\n")
    assert "PermissionError" in r.reason
    # The repository is world-readable on the host; inside, hidden_paths covers it.
    readme = REPO / "README.md"
    assert readme.stat().st_mode & stat.S_IROTH and REPO.stat().st_mode & stat.S_IXOTH
    read = f"print(open({str(readme)!r}).read()[:40])\n"
    r = contained(read)
    assert "PermissionError" in r.reason
    visible = run_python(read, SandboxLimits(wall_seconds=5))  # not hidden: readable, so the test above can fail
    assert visible.passed and visible.stdout_tail.strip() == readme.read_text()[:40].strip()
    r = contained("print(open('/etc/shadow').read())\n")
    assert "PermissionError" in r.reason


def test_no_connection_reaches_a_server_on_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        r = contained(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                      "s.sendall(b'exfiltrated')\n")
        assert "Network is unreachable" in r.reason
        r = contained(f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                      f"s.sendto(b'x', ('127.0.0.1', {port}))\n")
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected


def test_environment_secrets_are_not_visible(monkeypatch):
    token = f"s3cret-{uuid.uuid4().hex}"
    for key in ("QUANTPIPE_SANDBOX_SECRET", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, token)
    digest = hashlib.sha256(token.encode()).hexdigest()  # the program must not carry the token itself
    code = ("import hashlib, os\nprint(sorted(os.environ))\n"
            "try:\n    print(open('/proc/1/environ').read())\nexcept OSError as e:\n    print('init', type(e).__name__)\n"
            "def f():\n    return os.environ.get('QUANTPIPE_SANDBOX_SECRET') or os.environ['AWS_SECRET_ACCESS_KEY']\n\n"
            f"assert hashlib.sha256(f().encode()).hexdigest() == {digest!r}\n")
    r = contained(code)
    assert "KeyError" in r.reason
    assert token not in r.stdout_tail + r.stderr_tail
    keys = ast.literal_eval(r.stdout_tail.splitlines()[0])  # the names it printed
    assert set(keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LD_LIBRARY_PATH"}
    assert "init PermissionError" in r.stdout_tail


@pytest.mark.parametrize("kill", ["os.kill(os.getppid(), 9)", "os.kill(0, 9)", "os.kill(-1, 9)",
                                  "os.killpg(os.getpgid(0), 9)", "os.kill(1, 9)"])
def test_killing_its_parent_harms_neither_the_worker_nor_the_scorer(kill):
    pid, ppid = os.getpid(), os.getppid()
    r = contained(f"import os\n{kill}\n")
    assert r.reason.startswith(("exit 1: PermissionError", "exit 1: ProcessLookupError", "killed by SIGKILL")), r
    assert os.getpid() == pid and os.getppid() == ppid


def test_escaped_grandchildren_die_with_the_run():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.2)\nprint('left a daemon')\n")
    r = run_python(code, LIMITS)
    assert r.passed and r.stdout_tail == "left a daemon\n"
    assert uid_processes(r.uid) == [] and r.strays_killed == 0  # the PID namespace took it


def test_limits_are_validated():
    for bad in ({"cpu_seconds": 0}, {"memory_mb": 1}, {"wall_seconds": 0}, {"hidden_paths": ("relative",)},
                {"unknown": 1}):
        with pytest.raises(ValidationError):
            SandboxLimits(**bad)
    with pytest.raises(PipelineError, match="not a folder"):
        run_python("print(1)", SandboxLimits(hidden_paths=(REPO / "README.md",)))


def test_it_refuses_to_run_without_namespaces():
    """A worker without CAP_SYS_ADMIN cannot make namespaces: nothing runs, and it says so."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    probe = ("from quantpipe.validation.sandbox import *\nassert sandbox_available() is None\n"
             "try:\n    run_python('print(1)', SandboxLimits())\nexcept SandboxUnavailable as e:\n    print(e)\n")
    out = subprocess.run([setpriv, "--bounding-set", "-sys_admin", "--", sys.executable, "-c", probe],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "namespaces unavailable" in out.stdout and "Operation not permitted" in out.stdout


def test_not_root_is_refused(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="uid 1000"):
        run_python("print(1)", LIMITS)


@pytest.fixture(scope="module")
def problems(cache_dir):
    return load_problems(cache_dir)


def test_humaneval_canonical_solutions_pass_and_broken_bodies_fail(problems):
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    limits = SandboxLimits(hidden_paths=(REPO,))
    results = run_completions(problems, [p.canonical_solution for p in problems], limits)
    failed = [(p.task_id, r.reason) for p, r in zip(problems, results) if not r.passed]
    assert failed == [] and pass_at_1([r.passed for r in results]) == 1.0
    sample = problems[::16]
    broken = score_completions(sample, ["    return None\n"] * len(sample), limits)
    assert broken == [False] * len(sample) and pass_at_1(broken) == 0.0


def test_humaneval_hostile_completions_score_as_failures_beside_good_ones(problems):
    picked = problems[:6]
    hostile = ["    import os\n    os.kill(os.getppid(), 9)\n",
               "    while True:\n        pass\n",
               "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
               "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"]
    completions = [picked[0].canonical_solution, *hostile, picked[5].canonical_solution]
    scored = score_completions(picked, completions, SandboxLimits(wall_seconds=2, hidden_paths=(REPO,)))
    assert scored == [True, False, False, False, False, True]
    assert pass_at_1(scored) == pytest.approx(2 / 6)


def test_humaneval_program_layout_and_mismatched_inputs(problems):
    p = problems[2]
    text = program(p, p.canonical_solution)
    assert text.startswith(p.prompt + p.canonical_solution) and text.rstrip().endswith(f"check({p.entry_point})")
    with pytest.raises(PipelineError, match="exactly one per problem"):
        score_completions(problems[:2], ["x"], LIMITS)
    with pytest.raises(PipelineError, match="undefined"):
        pass_at_1([])
