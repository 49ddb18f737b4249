"""Launch and stop vLLM OpenAI-compatible servers as detached processes.

A server runs in its own session (it outlives the Airflow task that started it),
writes to its own log file, and is identified by (pid, kernel start time) so a
recycled PID is never signalled. The API key travels in the child's environment
(``VLLM_API_KEY``), never on the command line or in a log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from ..errors import PipelineError
from ..procs import pid_alive, start_ticks
from .settings import DeploySettings

log = logging.getLogger(__name__)


class LaunchError(PipelineError):
    """The server did not come up; the message carries the end of its log."""


class ServerHandle(BaseModel):
    pid: int
    start_ticks: int
    host: str
    port: int
    model_dir: str
    served_model_name: str
    log_path: str
    launched_at: float
    argv: list[str]
    devices: list[int] | None = None  # cuda: the GPUs it was pinned to (CUDA_VISIBLE_DEVICES); None: not pinned

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def is_alive(h: ServerHandle) -> bool:
    """Same process (pid and start time) and not a zombie."""
    return start_ticks(h.pid) == h.start_ticks and pid_alive(h.pid)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(s: DeploySettings, avoid: set[int] = frozenset()) -> int:
    lo, hi = s.backend_ports
    for port in range(lo, hi + 1):
        if port not in avoid and port_free(s.host, port):
            return port
    raise LaunchError(f"no free port in backend_ports {s.backend_ports} on {s.host}")


def build_argv(s: DeploySettings, model_dir: Path, served_name: str, port: int, target: str | None = None) -> list[str]:
    target = target or s.serving_target().name
    s = s.resolved(target)  # limits left at None take the target's defaults (settings.TARGET_DEFAULTS)
    argv = [*s.command, "serve", str(model_dir),
            "--served-model-name", served_name,
            "--host", s.host, "--port", str(port),
            "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", str(s.max_num_seqs),
            "--max-num-batched-tokens", str(s.max_num_batched_tokens),
            "--enable-chunked-prefill" if s.enable_chunked_prefill else "--no-enable-chunked-prefill",
            "--tensor-parallel-size", str(s.tensor_parallel_size),
            "--dtype", s.dtype,
            "--disable-uvicorn-access-log"]
    if target == "cuda":
        argv += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
    if s.enforce_eager:
        argv.append("--enforce-eager")
    return argv


# vLLM binds ZeroMQ IPC sockets as $TMPDIR/<uuid4>; a Unix socket path is limited to 107 bytes.
_SOCKET_PATH_ROOM = 107 - len("/") - 36


def scratch_dir(state_dir: Path) -> Path:
    """The server's TMPDIR: under the state folder, or a short private one when that is too long."""
    tmp = Path(state_dir) / "tmp"
    if len(str(tmp.resolve())) <= _SOCKET_PATH_ROOM:
        return tmp
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"quantpipe-vllm-{os.getuid()}-{digest}"


def build_env(s: DeploySettings, api_key: str | None, target: str | None = None,
              devices: list[int] | None = None) -> dict[str, str]:
    target = target or s.serving_target().name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "QUANTPIPE_VLLM_API"))}
    cache = s.state_dir / "cache"
    tmp = scratch_dir(s.state_dir)
    for d in (cache, tmp):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TMPDIR": str(tmp),
                "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "HF_HOME": str(cache / "hf"), "PYTHONUNBUFFERED": "1"})
    # The serving environment is its own venv: do not leak the Airflow venv into it.
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(k, None)
    if target.startswith("cpu"):
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{s.cpu_kvcache_space_gib:g}"
    elif devices is not None:  # pinned by the switch-over decision (nvidia-smi's indices: PCI bus order)
        env.update({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))})
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def launch(s: DeploySettings, model_dir: Path, served_name: str, *, port: int | None = None,
           api_key: str | None = None, tag: str = "server", devices: list[int] | None = None) -> ServerHandle:
    """Start the server detached and return at once (see ``wait_healthy``)."""
    exe = s.command[0]
    if "/" in exe and not os.access(exe, os.X_OK):
        raise LaunchError(f"vLLM command {exe} is not executable; run scripts/setup_serving_env.sh or set "
                          "QUANTPIPE_VLLM_CMD")
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise LaunchError(f"{model_dir} is not a checkpoint folder (no config.json)")
    port = port or pick_port(s)
    if not port_free(s.host, port):
        raise LaunchError(f"port {s.host}:{port} is already in use")
    logs = s.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{tag}-{port}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    target = s.serving_target().name
    argv = build_argv(s, model_dir, served_name, port, target)
    with open(log_path, "ab") as out:
        out.write((json.dumps({"argv": argv}) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=build_env(s, api_key, target, devices), cwd=str(s.state_dir), start_new_session=True,
                                close_fds=True)
    ticks = None
    for _ in range(50):
        ticks = start_ticks(proc.pid)
        if ticks is not None:
            break
        time.sleep(0.02)
    h = ServerHandle(pid=proc.pid, start_ticks=ticks or -1, host=s.host, port=port, model_dir=str(model_dir),
                     served_model_name=served_name, log_path=str(log_path), launched_at=time.time(), argv=argv,
                     devices=list(devices) if devices is not None and not target.startswith("cpu") else None)
    log.info("launched vLLM pid %d on %s for %s%s (log %s)", proc.pid, h.base_url, model_dir,
             f" on GPU(s) {h.devices}" if h.devices is not None else "", log_path)
    return h


def log_tail(h: ServerHandle, n: int = 30) -> str:
    try:
        lines = Path(h.log_path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def http_get(url: str, timeout: float = 5, api_key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthy(h: ServerHandle, timeout: float, poll: float = 1.0) -> float:
    """Block until /health answers 200; seconds since launch. Raises LaunchError if the process dies."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not is_alive(h):
            raise LaunchError(f"vLLM (pid {h.pid}) exited during startup for {h.model_dir}; end of its log "
                              f"{h.log_path}:\n{log_tail(h)}")
        try:
            status, _ = http_get(f"{h.base_url}/health", timeout=2)
            if status == 200:
                return time.time() - h.launched_at
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(poll)
    raise LaunchError(f"vLLM (pid {h.pid}) not healthy after {timeout:.0f} s; end of its log:\n{log_tail(h)}")


def group_rss_bytes(h: ServerHandle, proc: Path = Path("/proc")) -> int:
    """Resident memory of the server's process group (vLLM's engine core is a child); 0 when it is gone.
    Shared pages count once per process: an upper bound of what stopping it frees."""
    if not is_alive(h):
        return 0
    total = 0
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            pgrp = int(stat[stat.rindex(")") + 2:].split()[2])
            if pgrp != h.pid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def stop(h: ServerHandle, timeout: float = 30) -> bool:
    """SIGTERM the server's process group, SIGKILL after ``timeout``. False if it was already gone."""
    if not is_alive(h):
        return False
    try:
        os.killpg(h.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not is_alive(h):
            break
        time.sleep(0.25)
    else:
        log.warning("vLLM pid %d ignored SIGTERM for %.0f s; killing its group", h.pid, timeout)
        try:
            os.killpg(h.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # reap if it is our child (tests); detached servers are reaped by init
    try:
        os.waitpid(h.pid, os.WNOHANG)
    except ChildProcessError:
        pass
    log.info("stopped vLLM pid %d (%s)", h.pid, h.base_url)
    return True
