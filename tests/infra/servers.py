"""Real servers for tests, on 127.0.0.1 with free ports, stopped by PID.

    with redis_server(tmp) as r: ...          # Debian redis-server, password required
    with postgres_server(tmp) as pg: ...      # PostgreSQL 15, initdb as `postgres`, scram passwords
    with seaweedfs_server(tmp) as s3: ...     # `weed mini` S3 API, keys enforced via -s3.config

Install the binaries once with ``scripts/setup_test_services.sh``. Each context manager
raises ``ServiceError`` naming the problem (missing binary, port never opened, log tail)
and stops what it started by PID on exit, even when the body fails. The pytest fixtures
at the bottom wrap them (session scope) for tests/infra.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from quantpipe.procs import pid_alive

HOST = "127.0.0.1"
PG_BIN = Path(os.environ.get("QUANTPIPE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SETUP_HINT = "run scripts/setup_test_services.sh"


class ServiceError(RuntimeError):
    """A test service could not be started; the message says which and why."""


# ------------------------------------------------------------------------------ utilities
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def short_tmpdir(prefix: str) -> Path:
    """A short path under /tmp (unix socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))




def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 20.0, group: bool = False) -> None:
    """Send ``sig`` to ``pid`` (or its process group), wait, then SIGKILL."""
    def send(s):
        try:
            os.killpg(pid, s) if group else os.kill(pid, s)
        except (ProcessLookupError, PermissionError):
            pass
    if not pid_alive(pid):
        return
    send(sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # reap our own children so they do not linger as zombies
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    else:
        send(signal.SIGKILL)
    if group:  # stragglers in the group (forked children) go too
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(check, timeout: float, what: str, proc: subprocess.Popen | None, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} during startup; "
                               f"log {log}:\n{log_tail(log)}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise ServiceError(f"{what} not ready within {timeout:.0f} s; log {log}:\n{log_tail(log)}")


def _binary(name: str, fallback: Path | None = None) -> str:
    found = shutil.which(name)
    if found:
        return found
    if fallback is not None and fallback.exists():
        return str(fallback)
    raise ServiceError(f"{name} is not installed ({SETUP_HINT})")


def venv_bin(name: str) -> str:
    """A console script next to this interpreter (the project venv)."""
    p = Path(sys.executable).with_name(name)
    if not p.exists():
        raise ServiceError(f"{p} is missing; pip install -r requirements-dev.txt ({SETUP_HINT})")
    return str(p)


# ---------------------------------------------------------------------------------- Redis
@dataclass
class RedisServer:
    port: int
    password: str
    pid: int
    host: str = HOST

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/{db}"

    def ping(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=2) as s:
            s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
            data = b""
            while b"PONG" not in data and len(data) < 200:
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            return b"+PONG" in data


@contextmanager
def redis_server(workdir: Path, timeout: float = 20) -> Iterator[RedisServer]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exe = _binary("redis-server", Path("/usr/bin/redis-server"))
    port, password = free_port(), secrets.token_hex(16)
    conf = workdir / "redis.conf"  # password in a 0600 file, not on the command line
    conf.write_text(f"bind {HOST}\nport {port}\nprotected-mode yes\nsave \"\"\nappendonly no\n"
                    f"dir {workdir}\nrequirepass {password}\ndaemonize no\n")
    conf.chmod(0o600)
    log = workdir / "redis.log"
    proc = subprocess.Popen([exe, str(conf)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    srv = RedisServer(port=port, password=password, pid=proc.pid)
    try:
        _wait(srv.ping, timeout, f"redis-server on {HOST}:{port}", proc, log)
        yield srv
    finally:
        stop_pid(proc.pid)
        proc.wait(timeout=5)


# ----------------------------------------------------------------------------- PostgreSQL
@dataclass
class PostgresServer:
    port: int
    user: str
    password: str
    database: str
    pid: int
    datadir: Path
    host: str = HOST

    def url(self, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def celery_result_backend(self) -> str:
        return "db+" + self.url("postgresql")

    def connect(self, database: str | None = None):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password, dbname=database or self.database,
                                connect_timeout=5)


@contextmanager
def postgres_server(workdir: Path, database: str = "airflow", timeout: float = 60) -> Iterator[PostgresServer]:
    """initdb + postgres bound to 127.0.0.1 (socket in workdir), scram passwords on TCP."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            raise ServiceError(f"{PG_BIN / tool} is missing: PostgreSQL 15 is not installed ({SETUP_HINT})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    run_as: list[str] = ["runuser", "-u", "postgres", "--"] if as_root else []
    datadir, sockdir = workdir / "pgdata", workdir / "pgsock"
    sockdir.mkdir(exist_ok=True)
    user, password = "quantpipe", secrets.token_hex(16)
    pwfile = workdir / "pgpass.txt"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    log = workdir / "postgres.log"
    if as_root:
        import pwd

        pg = pwd.getpwnam("postgres")
        for p in (workdir, sockdir, pwfile):
            os.chown(p, pg.pw_uid, pg.pw_gid)
        # initdb needs to reach workdir: every parent must be traversable by `postgres`
        for parent in workdir.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise ServiceError(f"{parent} is not traversable by user postgres; use a workdir "
                                   "under /tmp (short_tmpdir())")
    r = subprocess.run([*run_as, str(PG_BIN / "initdb"), "-D", str(datadir), "-U", user,
                        f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                       capture_output=True, text=True)
    pwfile.unlink()
    if r.returncode != 0:
        raise ServiceError(f"initdb failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    port = free_port()
    opts = (f"-h {HOST} -p {port} -k {sockdir} -c listen_addresses={HOST} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    if as_root:
        import pwd

        pg = pwd.getpwnam("postgres")
        log.touch()
        os.chown(log, pg.pw_uid, pg.pw_gid)
    r = subprocess.run([*run_as, str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-l", str(log),
                        "-o", opts, "-w", "-t", str(int(timeout)), "start"], capture_output=True, text=True)
    pidfile = datadir / "postmaster.pid"
    pid = int(pidfile.read_text().split()[0]) if pidfile.exists() else None
    try:
        if r.returncode != 0 or pid is None:
            raise ServiceError(f"postgres did not start on {HOST}:{port} ({r.stderr.strip()}); "
                               f"log {log}:\n{log_tail(log)}")
        srv = PostgresServer(port=port, user=user, password=password, database=database, pid=pid,
                             datadir=datadir)
        conn = srv.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield srv
    finally:
        if pid is not None:
            stop_pid(pid, signal.SIGINT, timeout=30)  # SIGINT = fast shutdown


# ------------------------------------------------------------------------- SeaweedFS (S3)
@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int
    ports: dict = field(default_factory=dict)
    region: str = "us-east-1"

    def fs(self, secret_key: str | None = None, access_key: str | None = None, **kw):
        """An s3fs filesystem on this store (optionally with other credentials)."""
        import s3fs

        return s3fs.S3FileSystem(key=access_key or self.access_key, secret=secret_key or self.secret_key,
                                 endpoint_url=self.endpoint, client_kwargs={"region_name": self.region},
                                 skip_instance_cache=True, **kw)

    def airflow_conn_json(self) -> str:
        """An ``aws`` connection for AIRFLOW_CONN_<ID> (JSON form)."""
        return json.dumps({"conn_type": "aws", "login": self.access_key, "password": self.secret_key,
                           "extra": {"endpoint_url": self.endpoint, "region_name": self.region}})

    def storage_options(self) -> dict:
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}}


@contextmanager
def seaweedfs_server(workdir: Path, bucket: str = "quantpipe-artifacts", timeout: float = 60) -> Iterator[S3Server]:
    """``weed mini`` with every port chosen here and bound to 127.0.0.1, one identity
    (random key and secret) from ``-s3.config``, and ``bucket`` created at startup."""
    if not 3 <= len(bucket) <= 63:
        raise ServiceError(f"bucket name {bucket!r} must be 3-63 characters")
    weed = venv_bin("weed")
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    access, secret = "QP" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    cfg = workdir / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "quantpipe", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    cfg.chmod(0o600)
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
             "s3", "s3.grpc", "admin", "admin.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    args = [weed, "mini", f"-dir={workdir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}", f"-bucket={bucket}",
            f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}"]
    args += [f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
             for name, port in ports.items()]
    log = workdir / "weed.log"
    proc = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=workdir,
                            start_new_session=True)
    srv = S3Server(endpoint=f"http://{HOST}:{ports['s3']}", access_key=access, secret_key=secret,
                   bucket=bucket, pid=proc.pid, ports=ports)
    try:
        fs = srv.fs()
        _wait(lambda: fs.invalidate_cache() or fs.exists(bucket), timeout,
              f"SeaweedFS S3 on {srv.endpoint} (bucket {bucket})", proc, log)
        yield srv
    finally:
        stop_pid(proc.pid, timeout=8)  # weed sometimes lingers after heavy multipart use
        proc.wait(timeout=5)


# ------------------------------------------------------------------------------ fixtures
try:
    import pytest
except ImportError:  # used from scripts without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def redis_srv() -> Iterator[RedisServer]:
        d = short_tmpdir("qp-redis-")
        with redis_server(d) as srv:
            yield srv
        shutil.rmtree(d, ignore_errors=True)

    @pytest.fixture(scope="session")
    def postgres_srv() -> Iterator[PostgresServer]:
        d = short_tmpdir("qp-pg-")
        os.chmod(d, 0o755)
        with postgres_server(d) as srv:
            yield srv
        shutil.rmtree(d, ignore_errors=True)

    @pytest.fixture(scope="session")
    def s3_srv() -> Iterator[S3Server]:
        d = short_tmpdir("qp-s3-")
        with seaweedfs_server(d) as srv:
            yield srv
        shutil.rmtree(d, ignore_errors=True)
