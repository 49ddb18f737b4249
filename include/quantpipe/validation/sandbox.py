"""Run model-written Python in isolation: one program, one throwaway process tree, no way out.

``run_python(code, limits)`` runs ``code`` with the interpreter's standard library only and
reports how it ended. What holds the program (Linux, the worker running as root):

- **namespaces**: its own network namespace (no interface is up, not even loopback: no
  connection leaves, 127.0.0.1 included), PID namespace (it sees only its own processes; when
  the program ends, the kernel kills every process it left behind), mount, IPC and UTS namespaces;
- **an unprivileged uid/gid** chosen at random for the run (no groups, ``no_new_privs``): root's
  files are out of reach, and ``RLIMIT_NPROC`` counts only this run's processes, so two runs
  side by side never share one process budget (they would under ``nobody``);
- **rlimits** on CPU seconds, address space, file size, process count, open files, no core dumps;
- **a read-only filesystem** except its own throwaway directory (the working directory, ``HOME``
  and ``TMPDIR``; removed afterwards); ``limits.hidden_paths`` (the artifact store, the
  repository) are covered by an empty folder nobody may open;
- **an empty environment** (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``; nothing of the worker's);
- **a wall-clock limit**: past it the namespace's init is killed, and the kernel kills every
  process in the PID namespace with it (``setsid`` or double forks do not escape); should the
  launcher not return, its whole session is killed (``killpg``); any process still running
  under the run's uid afterwards is killed too (``strays_killed``, 0 unless something escaped).

Process tree: the worker starts a launcher (root, its own session) that unshares the
namespaces and forks the namespace's init (root, ``PR_SET_PDEATHSIG``); init makes the
mounts, forks the program's process, which sets its limits, drops to the run's uid and execs
the interpreter. Nothing is run without all of this: a host that cannot provide it raises
``SandboxUnavailable`` (there is no weaker fallback), and ``sandbox_available()`` says which.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import PipelineError

UID_BASE = 1_000_000_000  # far above any uid a host assigns; a run's uid is UID_BASE + a random offset
UID_SPAN = 1_000_000_000
PROGRAM = "program.py"


class SandboxUnavailable(PipelineError):
    """This host cannot isolate model-written code the way ``run_python`` requires; nothing ran."""


class SandboxLimits(BaseModel):
    """What one sandboxed program may use; the defaults fit a HumanEval problem with room to spare."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_seconds: int = Field(5, ge=1, le=3600,
                             description="CPU time (RLIMIT_CPU; SIGXCPU, then SIGKILL a second later)")
    memory_mb: int = Field(1024, ge=64, le=1 << 20, description="address space (RLIMIT_AS) of each process")
    file_mb: int = Field(16, ge=1, le=1 << 20, description="largest file it may write, stdout and stderr included")
    max_procs: int = Field(16, ge=1, le=4096, description="processes and threads of its uid at once (RLIMIT_NPROC)")
    max_open_files: int = Field(64, ge=16, le=65536, description="open file descriptors (RLIMIT_NOFILE)")
    wall_seconds: float = Field(10.0, gt=0, le=3600, description="wall-clock limit; past it the whole tree is killed")
    output_chars: int = Field(2000, ge=0, le=1 << 20, description="how much of the end of stdout and stderr is kept")
    hidden_paths: tuple[Path, ...] = Field(
        (), description="folders (artifact store, repository) covered by an empty unreadable folder inside")

    @field_validator("hidden_paths")
    @classmethod
    def _absolute(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        for p in v:
            if not p.is_absolute():
                raise ValueError(f"hidden path {p} must be absolute")
        return v


class SandboxResult(BaseModel):
    """How one program ended. ``passed`` only for exit status 0 within every limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    reason: str
    stdout_tail: str
    stderr_tail: str
    seconds: float
    uid: int
    strays_killed: int
    isolation: str


# Runs as root under ``python -I -S -B -c``: the launcher, then (forked) the namespace's init, then
# (forked) the program's process. argv[1] is the run's JSON config. Setup problems are reported as
# an "error ..." line on the status fd and end the run before any model-written code executes.
_BOOT = r'''
import ctypes, json, os, resource, signal, sys

cfg = json.loads(sys.argv[1])
STATUS = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
NEWNS, NEWUTS, NEWIPC, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18


def report(line):
    os.write(STATUS, (line.replace("\n", " ") + "\n").encode())


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def unescape(field):
    out, i = "", 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out, i = out + chr(int(field[i + 1:i + 4], 8)), i + 4
        else:
            out, i = out + field[i], i + 1
    return out


def read_only_everywhere():
    with open("/proc/self/mountinfo") as f:
        mounts = [(unescape(line.split()[4]), line.split()[5].split(",")) for line in f]
    for point, opts in mounts:
        keep = (NODEV if "nodev" in opts else 0) | (NOEXEC if "noexec" in opts else 0)
        try:
            mount(None, point, None, REMOUNT | BIND | RDONLY | NOSUID | keep)
        except FileNotFoundError:
            pass  # shadowed by a later mount over a parent folder: unreachable, nothing to protect


def setup_mounts():
    mount(None, "/", None, REC | PRIVATE)  # first: nothing below may propagate to the host
    read_only_everywhere()
    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC | RDONLY)
    mount(cfg["work"], cfg["work"], None, BIND)
    mount(None, cfg["work"], None, REMOUNT | BIND | NOSUID | NODEV)
    mount(cfg["python_src"], cfg["python_dst"], None, BIND | REC)
    mount(None, cfg["python_dst"], None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    for p in cfg["hidden"]:
        mount("tmpfs", p, "tmpfs", RDONLY | NOSUID | NODEV | NOEXEC, "size=4k,nr_inodes=1,mode=000")


def program():
    os.set_inheritable(STATUS, False)
    for res, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, res), (soft, hard))
    uid = cfg["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
        raise OSError("could not drop privileges")
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.chdir(cfg["work"])
    os.umask(0o077)
    exe = cfg["python"]
    os.execve(exe, [exe, "-I", "-S", "-B", cfg["program"]], cfg["env"])


def init():
    check(libc.prctl(1, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    setup_mounts()
    child = os.fork()
    if child == 0:
        try:
            program()
        except BaseException as e:
            report(f"error program setup: {e!r}")
        os._exit(125)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        report(f"signal {os.WTERMSIG(status)}")
    else:
        report(f"exit {os.WEXITSTATUS(status)}")


try:
    check(libc.unshare(NEWNS | NEWUTS | NEWIPC | NEWPID | NEWNET), "unshare(net, pid, mount, ipc, uts)")
except BaseException as e:
    report(f"error namespaces unavailable: {e}")
    sys.exit(125)
first = os.fork()
if first == 0:
    try:
        init()
    except BaseException as e:
        report(f"error sandbox setup: {e!r}")
        os._exit(125)
    os._exit(0)
# SIGTERM from the worker (wall-clock limit): kill the init, which empties the namespace; the
# launcher exits once the kernel has killed and reaped every process in it.
signal.signal(signal.SIGTERM, lambda *_: os.kill(first, signal.SIGKILL))
os.waitpid(first, 0)
'''


def _interpreter() -> tuple[Path, Path, str]:
    """The base interpreter (not a venv's wrapper): its prefix, and its path and shared-library
    folder relative to that prefix. The prefix is mounted read-only inside the sandbox."""
    prefix = Path(sys.base_prefix).resolve()
    exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    try:
        rel = exe.relative_to(prefix)
    except ValueError as e:
        raise SandboxUnavailable(f"the interpreter {exe} is not under its prefix {prefix}; "
                                 "cannot mount it into the sandbox") from e
    libdir = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    lib_rel = ""
    if libdir:
        try:
            lib_rel = str(Path(libdir).resolve().relative_to(prefix))
        except ValueError as e:
            raise SandboxUnavailable(f"libpython's folder {libdir} is not under {prefix}") from e
    return prefix, rel, lib_rel


def _host_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces; this host is {sys.platform}"
    if os.geteuid() != 0:
        return (f"the worker runs as uid {os.geteuid()}: the sandbox needs root (CAP_SYS_ADMIN for the "
                "network/PID/mount namespaces, CAP_SETUID to drop to an unprivileged uid)")
    return None


def _isolation(uid: int, limits: SandboxLimits) -> str:
    hidden = ", ".join(str(p) for p in limits.hidden_paths) or "none"
    return (f"network, PID, mount, IPC and UTS namespaces; uid/gid {uid} without groups, no_new_privs; "
            f"read-only filesystem except its own folder; hidden: {hidden}; "
            f"rlimits cpu {limits.cpu_seconds}s, address space {limits.memory_mb} MB, file {limits.file_mb} MB, "
            f"{limits.max_procs} processes; wall {limits.wall_seconds:g}s")


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int, int]]:
    mb = 1 << 20
    return [("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1),
            ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
            ("RLIMIT_FSIZE", limits.file_mb * mb, limits.file_mb * mb),
            ("RLIMIT_NPROC", limits.max_procs, limits.max_procs),
            ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files),
            ("RLIMIT_CORE", 0, 0)]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _tail(path: Path, chars: int) -> str:
    if chars == 0:
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def _kill_uid(uid: int) -> int:
    """SIGKILL every process still running under ``uid`` (there should be none: the PID
    namespace went with its init). Repeats until none is left, for one that forked meanwhile."""
    killed = 0
    for _ in range(100):
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                lines = (d / "status").read_text().splitlines()
            except OSError:
                continue
            uids = next((ln.split()[1:] for ln in lines if ln.startswith("Uid:")), [])
            if str(uid) in uids:
                found.append(int(d.name))
        if not found:
            return killed
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    raise SandboxUnavailable(f"processes of sandbox uid {uid} keep appearing after SIGKILL")


def _verdict(status: list[str], timed_out: bool, limits: SandboxLimits, stderr: str
             ) -> tuple[bool, int | None, int | None, str]:
    """(passed, exit code, signal, reason) from the init's status lines."""
    errors = [s[len("error "):] for s in status if s.startswith("error ")]
    if errors:
        raise SandboxUnavailable(f"the sandbox could not be set up, nothing ran: {errors[0]}")
    if timed_out:
        return False, None, signal.SIGKILL, f"wall-clock limit of {limits.wall_seconds:g}s reached; killed"
    if not status:
        return False, None, None, "the sandbox ended without reporting how the program ended"
    kind, _, value = status[-1].partition(" ")
    n = int(value)
    if kind == "signal":
        names = {signal.SIGXCPU: f"CPU time limit of {limits.cpu_seconds}s",
                 signal.SIGXFSZ: f"file size limit of {limits.file_mb} MB"}
        return False, None, n, names.get(n, f"killed by {signal.Signals(n).name}")
    if n == 0:
        return True, 0, None, "passed"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if last.startswith("MemoryError"):
        last += f" (address-space limit {limits.memory_mb} MB)"
    return False, n, None, f"exit {n}: {last}" if last else f"exit {n}"


def run_python(code: str, limits: SandboxLimits) -> SandboxResult:
    """Run ``code`` as a Python program in a fresh sandbox; raises ``SandboxUnavailable`` (and runs
    nothing) when this host cannot isolate it."""
    problem = _host_problem()
    if problem:
        raise SandboxUnavailable(problem)
    prefix, exe_rel, lib_rel = _interpreter()
    for p in limits.hidden_paths:
        if p.exists() and not p.is_dir():
            raise PipelineError(f"hidden path {p} is not a folder: only folders can be hidden from the sandbox")
    hidden = [p.resolve() for p in limits.hidden_paths if p.is_dir()]
    uid = UID_BASE + secrets.randbelow(UID_SPAN)
    box = Path(tempfile.mkdtemp(prefix="quantpipe-sandbox-")).resolve()
    for p in hidden:
        if _within(box, p) or _within(p, box):
            shutil.rmtree(box, ignore_errors=True)
            raise SandboxUnavailable(f"the sandbox folder {box} lies inside hidden path {p}: set TMPDIR elsewhere")
    fds: list[int] = []
    try:
        os.chmod(box, 0o711)  # the program's uid may pass through, not list or read
        work, pydst = box / "work", box / "python"
        work.mkdir(mode=0o700)
        pydst.mkdir(mode=0o755)
        (work / PROGRAM).write_text(code, encoding="utf-8")
        for p in (work, work / PROGRAM):
            os.chown(p, uid, uid)
        for name in ("stdout", "stderr", "status"):
            fds.append(os.open(box / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600))
        out_fd, err_fd, status_fd = fds
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        if lib_rel:
            env["LD_LIBRARY_PATH"] = str(pydst / lib_rel)  # libpython's RUNPATH points to the real prefix
        cfg = {"status_fd": status_fd, "work": str(work), "program": PROGRAM, "uid": uid, "env": env,
               "python_src": str(prefix), "python_dst": str(pydst), "python": str(pydst / exe_rel),
               "hidden": [str(p) for p in hidden], "rlimits": _rlimits(limits)}
        launcher = str(prefix / exe_rel)
        start = time.monotonic()
        proc = subprocess.Popen([launcher, "-I", "-S", "-B", "-c", _BOOT, json.dumps(cfg)], cwd="/",
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                stdout=out_fd, stderr=err_fd, pass_fds=(status_fd,), start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # the launcher kills the namespace's init and returns once it is empty
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            if proc.returncode is None:  # not reaped yet: its process group id cannot have been reused
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        strays = _kill_uid(uid)
        status = (box / "status").read_text().splitlines()
        stdout, stderr = _tail(box / "stdout", limits.output_chars), _tail(box / "stderr", limits.output_chars)
        passed, exit_code, sig, reason = _verdict(status, timed_out, limits, stderr)
        return SandboxResult(passed=passed, exit_code=exit_code, signal=sig, timed_out=timed_out, reason=reason,
                             stdout_tail=stdout, stderr_tail=stderr, seconds=round(seconds, 3), uid=uid,
                             strays_killed=strays, isolation=_isolation(uid, limits))
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(box, ignore_errors=True)


def sandbox_available(limits: SandboxLimits | None = None) -> str | None:
    """What isolation this host gives model-written code (one line), or None when it cannot run
    the sandbox at all; ``run_python`` then raises ``SandboxUnavailable`` with the reason."""
    try:
        result = run_python("print('sandbox ok')", limits or SandboxLimits())
    except SandboxUnavailable:
        return None
    return result.isolation if result.passed and result.stdout_tail.strip() == "sandbox ok" else None
