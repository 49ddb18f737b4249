"""A small client of Airflow 3's REST API (``/api/v2``, JWT from ``/auth/token``), for the
scripts and tests that drive a running Airflow: trigger a DAG, wait for its run, read task
instances, logs and XComs. Standard library only.

    api = AirflowRest("http://127.0.0.1:8080", {"admin": "secret"})
    run_id = api.trigger("llm_quantization", {"method": "w8a8", "bits": 8})
    api.wait_run("llm_quantization", run_id, timeout=900)
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


class AirflowRestError(RuntimeError):
    """The API refused a call or a run did not finish; the message says which and why."""


@dataclass
class AirflowRest:
    base_url: str
    passwords: dict = field(default_factory=dict, repr=False)  # user -> password
    _token: str | None = field(default=None, repr=False)

    # hooks for a subclass that owns the processes behind the API
    def check_alive(self) -> None:
        """Raise when a component behind the API has died (nothing to check here)."""

    def diagnostics(self) -> str:
        """Text to add to an error (e.g. a log tail)."""
        return ""

    def http(self, method: str, path: str, body: dict | None = None, token: bool = True,
             accept: str = "application/json", timeout: float = 30) -> tuple[int, object]:
        headers = {"Content-Type": "application/json", "Accept": accept}
        if token:
            headers["Authorization"] = f"Bearer {self.token()}"
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def token(self, user: str = "admin") -> str:
        if self._token is None or user != "admin":
            status, body = self.http("POST", "/auth/token",
                                     {"username": user, "password": self.passwords[user]}, token=False)
            if status not in (200, 201):
                raise AirflowRestError(f"login as {user} failed: {status} {body}")
            if user != "admin":
                return body["access_token"]
            self._token = body["access_token"]
        return self._token

    def trigger(self, dag_id: str, conf: dict | None = None, parse_timeout: float = 120) -> str:
        deadline = time.monotonic() + parse_timeout
        while True:  # the dag-processor needs a moment to parse the DAG on a fresh DB
            status, body = self.http("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise AirflowRestError(f"DAG {dag_id} not available after {parse_timeout:.0f} s: {status} "
                                       f"{body}{self.diagnostics()}")
            time.sleep(1)
        status, run = self.http("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        if status not in (200, 201):
            raise AirflowRestError(f"trigger of {dag_id} refused ({status}): {run}")
        return run["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600,
                 min_try: dict[str, int] | None = None) -> dict:
        """Wait for the run to finish; ``min_try`` (task -> try number) waits out a cleared task."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, run = self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if isinstance(run, dict) and run.get("state") in ("success", "failed"):
                if not min_try:
                    return run
                tries = {t["task_id"]: t["try_number"] for t in self.task_instances(dag_id, run_id)}
                if all(tries.get(t, 0) >= n for t, n in min_try.items()):
                    return run
            self.check_alive()
            time.sleep(1)
        raise AirflowRestError(f"run {run_id} of {dag_id} not finished within {timeout:.0f} s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        _, body = self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return body["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task's log through the REST API, as text (one event per line)."""
        status, body = self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
                                        f"/logs/{try_number}?full_content=true")
        if status != 200:
            raise AirflowRestError(f"log of {task_id} not readable: {status} {body}")
        content = body.get("content", body) if isinstance(body, dict) else body
        if isinstance(content, list):
            return "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content)
        return str(content)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        status, body = self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
                                        f"/xcomEntries/{key}")
        if status != 200:
            raise AirflowRestError(f"xcom {key} of {task_id}: {status} {body}")
        v = body.get("value")
        return json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
