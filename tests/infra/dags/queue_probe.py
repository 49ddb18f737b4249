"""Queue probe: one task per Celery queue of the quantization DAG.

Each task logs the ``WORKER_QUEUE_TAG`` of the worker that ran it (the engine test starts
one worker per queue, tagged with its queue name), fails if the tag is not its own queue,
and writes a small artifact to the store through ``quantpipe.objectstore`` (manifest last).
A re-run whose artifact is already complete skips the upload and says so.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from datetime import datetime
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

QUEUES = ("default", "gpu-a100", "gpu-h100", "serving")


def _probe(queue: str) -> dict:
    import logging

    from quantpipe.objectstore import is_complete, upload_folder, verify_remote
    from quantpipe_storage import artifact_fs

    log = logging.getLogger("queue_probe")
    ctx = get_current_context()
    params = ctx["params"]
    tag = os.environ.get("WORKER_QUEUE_TAG", "<unset>")
    log.info("QUEUE_PROBE task=%s queue=%s WORKER_QUEUE_TAG=%s pid=%d", ctx["ti"].task_id, queue, tag,
             os.getpid())
    if tag != queue:
        raise RuntimeError(f"task for queue {queue!r} ran on a worker tagged {tag!r}")
    fs, uri = artifact_fs(params["conn_id"], f"{params['store_uri'].rstrip('/')}/{ctx['run_id']}/{queue}")
    if is_complete(fs, uri):
        log.info("artifact %s is already complete; skipping the upload", uri)
        return {"queue": queue, "uri": uri, "worker_tag": tag, "skipped": True}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "probe.json").write_text(json.dumps({"queue": queue, "worker_tag": tag,
                                                       "host": socket.gethostname(), "pid": os.getpid(),
                                                       "run_id": ctx["run_id"]}))
        (folder / "payload.bin").write_bytes(os.urandom(64 * 1024))
        upload_folder(folder, fs, uri, meta={"queue": queue, "run_id": ctx["run_id"]})
    manifest = verify_remote(fs, uri, deep=True)
    log.info("QUEUE_PROBE artifact %s verified (%d files)", uri, len(manifest["files"]))
    return {"queue": queue, "uri": uri, "worker_tag": tag, "skipped": False}


@dag(
    dag_id="queue_probe",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["infra-test"],
    params={"conn_id": Param("quantpipe_s3", type="string"),
            "store_uri": Param("s3://quantpipe-artifacts/queue-probe", type="string")},
    default_args={"retries": 0},
)
def queue_probe():
    for q in QUEUES:
        task(task_id=f"probe_{q.replace('-', '_')}", queue=q)(_probe)(q)


queue_probe()
