"""quantpipe.objectstore against a real S3 store (SeaweedFS on 127.0.0.1, keys enforced)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from quantpipe.objectstore import (
    MANIFEST,
    ObjectStoreAccessError,
    ObjectStoreError,
    is_complete,
    manifest_digest,
    stage_folder,
    upload_folder,
    verify_remote,
)

MiB = 1 << 20
BLOCK = 5 * MiB  # the S3 multipart minimum: bigger files become multipart uploads


def _artifact(folder: Path, big_mib: int = 12) -> Path:
    """A checkpoint-like folder: small JSON, nested file, one multi-part-sized file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}" * 1000)
    with open(folder / "model.safetensors", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    return folder


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _dest(s3) -> str:
    return f"s3://{s3.bucket}/tests/{uuid.uuid4().hex[:10]}/quantized"


def test_round_trip_with_manifest(s3_srv, tmp_path):
    fs = s3_srv.fs()
    src = _artifact(tmp_path / "ckpt")
    dest = _dest(s3_srv)
    assert not is_complete(fs, dest)

    manifest = upload_folder(src, fs, dest, meta={"run_id": "r1"}, block_size=BLOCK)

    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {"config.json", "sub/tokenizer.json", "model.safetensors"}
    for rel, entry in files.items():
        assert entry["size"] == (src / rel).stat().st_size
        assert entry["sha256"] == _sha(src / rel)
    assert is_complete(fs, dest)
    assert verify_remote(fs, dest, deep=True)["meta"] == {"run_id": "r1"}
    stored = json.loads(fs.cat_file(f"{dest}/{MANIFEST}"))
    assert manifest_digest(stored) == manifest_digest(manifest)

    staged = stage_folder(fs, dest, tmp_path / "cache", block_size=BLOCK)
    assert staged.name == manifest_digest(manifest)
    for rel in files:
        assert _sha(staged / rel) == _sha(src / rel)

    # a complete artifact is never silently replaced
    with pytest.raises(ObjectStoreError, match="already holds a complete artifact"):
        upload_folder(src, fs, dest, block_size=BLOCK)


def test_wrong_secret_fails_clearly_and_stores_nothing(s3_srv, tmp_path):
    good = s3_srv.fs()
    wrong_secret = "not-the-secret-" + uuid.uuid4().hex
    bad = s3_srv.fs(secret_key=wrong_secret)
    src = _artifact(tmp_path / "ckpt", big_mib=1)
    dest = _dest(s3_srv)

    with pytest.raises(ObjectStoreAccessError) as err:
        upload_folder(src, bad, dest, block_size=BLOCK)
    msg = str(err.value)
    assert "refused" in msg and "access key" in msg and dest in msg
    assert wrong_secret not in msg and s3_srv.secret_key not in msg

    # wrong credentials are an error, not "incomplete"
    with pytest.raises(ObjectStoreAccessError):
        is_complete(bad, dest)
    good.invalidate_cache()
    assert not good.exists(dest)
    assert good.find(dest) == []


def test_upload_killed_midway_leaves_nothing_complete_and_retry_completes(s3_srv, tmp_path):
    fs = s3_srv.fs()
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "a_config.json").write_text('{"a": 1}')
    with open(src / "b_weights.bin", "wb") as f:  # 48 MiB = ~10 parts of 5 MiB
        for _ in range(48):
            f.write(os.urandom(MiB))
    dest = _dest(s3_srv)
    key = dest.split("://", 1)[1].split("/", 1)[1] + "/b_weights.bin"

    uploader = textwrap.dedent("""
        import os, sys, s3fs
        from pathlib import Path
        from quantpipe.objectstore import upload_folder
        fs = s3fs.S3FileSystem(key=os.environ["T_KEY"], secret=os.environ["T_SECRET"],
                               endpoint_url=os.environ["T_ENDPOINT"], skip_instance_cache=True)
        upload_folder(Path(sys.argv[1]), fs, sys.argv[2], block_size=5 << 20)
        print("UPLOAD FINISHED", flush=True)
    """)
    env = {**os.environ, "T_KEY": s3_srv.access_key, "T_SECRET": s3_srv.secret_key,
           "T_ENDPOINT": s3_srv.endpoint}
    proc = subprocess.Popen([sys.executable, "-c", uploader, str(src), dest], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # kill it once the big file's multipart upload is under way (some parts sent)
    deadline = time.monotonic() + 60
    in_progress = False
    while time.monotonic() < deadline and proc.poll() is None:
        uploads = fs.list_multipart_uploads(s3_srv.bucket)
        mine = [u for u in uploads if u.get("Key") == key]
        if mine:
            parts = fs.call_s3("list_parts", Bucket=s3_srv.bucket, Key=key,
                               UploadId=mine[0]["UploadId"]).get("Parts", [])
            if len(parts) >= 2:
                in_progress = True
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=10)[0].decode()
    assert in_progress, f"the upload never reached the big file's parts: {out}"
    assert proc.returncode == -signal.SIGKILL and "UPLOAD FINISHED" not in out

    fs.invalidate_cache()
    assert not fs.exists(f"{dest}/{MANIFEST}")
    assert not is_complete(fs, dest)
    with pytest.raises(ObjectStoreError, match="incomplete"):
        verify_remote(fs, dest)
    assert not fs.exists(f"{dest}/b_weights.bin"), "an unfinished multipart upload must not be an object"
    with pytest.raises(ObjectStoreError, match="no MANIFEST.json"):
        stage_folder(fs, dest, tmp_path / "cache")

    # the retry clears the leftover and produces exactly one complete, verified artifact
    manifest = upload_folder(src, fs, dest, block_size=BLOCK)
    assert verify_remote(fs, dest, deep=True)["files"] == manifest["files"]
    fs.invalidate_cache()
    stored = sorted(p.split(dest.split("://", 1)[1] + "/", 1)[1] for p in fs.find(dest))
    assert stored == sorted([MANIFEST, "a_config.json", "b_weights.bin"])


def test_stage_folder_reuses_cache_and_rejects_corruption(s3_srv, tmp_path):
    fs = s3_srv.fs()
    src = _artifact(tmp_path / "ckpt", big_mib=6)
    dest = _dest(s3_srv)
    manifest = upload_folder(src, fs, dest, block_size=BLOCK)
    cache = tmp_path / "cache"

    first = stage_folder(fs, dest, cache, block_size=BLOCK)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    # the remote data file goes away: a second stage must not need it (the cache is reused)
    fs.rm_file(f"{dest}/model.safetensors")
    second = stage_folder(fs, dest, cache, block_size=BLOCK)
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert _sha(second / "model.safetensors") == _sha(src / "model.safetensors")

    # same size, other bytes: a fresh stage detects it, and leaves no partial cache entry
    fs.pipe_file(f"{dest}/model.safetensors", os.urandom((src / "model.safetensors").stat().st_size))
    fresh = tmp_path / "cache2"
    with pytest.raises(ObjectStoreError, match="sha256"):
        stage_folder(fs, dest, fresh, block_size=BLOCK)
    assert not (fresh / manifest_digest(manifest)).exists()
    assert [p.name for p in fresh.iterdir()] == []
    assert not is_complete(fs, dest, deep=True)


def test_upload_memory_is_bounded(s3_srv, tmp_path):
    """A 96 MiB file streams through in 5 MiB parts: peak RSS grows by far less than its size."""
    src = tmp_path / "big"
    src.mkdir()
    with open(src / "weights.bin", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    code = textwrap.dedent("""
        import os, sys, s3fs
        from pathlib import Path
        from quantpipe.objectstore import upload_folder
        fs = s3fs.S3FileSystem(key=os.environ["T_KEY"], secret=os.environ["T_SECRET"],
                               endpoint_url=os.environ["T_ENDPOINT"], skip_instance_cache=True)
        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1])  # kB
        fs.ls(sys.argv[3])  # warm up the client before the baseline
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        before = status("VmRSS:")
        upload_folder(Path(sys.argv[1]), fs, sys.argv[2], block_size=5 << 20)
        print((status("VmHWM:") - before) // 1024)
    """)
    env = {**os.environ, "T_KEY": s3_srv.access_key, "T_SECRET": s3_srv.secret_key,
           "T_ENDPOINT": s3_srv.endpoint}
    dest = _dest(s3_srv)
    r = subprocess.run([sys.executable, "-c", code, str(src), dest, s3_srv.bucket], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    growth_mib = int(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth uploading 96 MiB: {growth_mib} MiB")
    assert growth_mib < 48
    assert is_complete(s3_srv.fs(), dest)


def test_airflow_connection_helper_gives_plain_uris(s3_srv, tmp_path, monkeypatch):
    """plugins/quantpipe_storage: connection id + s3:// URI -> s3fs; URIs handed out carry no conn id."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "plugins"))
    monkeypatch.setenv("AIRFLOW_CONN_QP_TEST_S3", s3_srv.airflow_conn_json())
    from quantpipe_storage import ArtifactStoreConfigError, artifact_fs, plain_uri, storage_path

    dest = _dest(s3_srv)
    fs, uri = artifact_fs("qp_test_s3", dest)
    assert uri == dest and "qp_test_s3" not in uri
    assert "qp_test_s3@" in str(storage_path(dest, "qp_test_s3"))  # why str() must never be logged
    assert plain_uri(storage_path(dest, "qp_test_s3")) == dest
    upload_folder(_artifact(tmp_path / "a", big_mib=1), fs, uri, block_size=BLOCK)
    assert is_complete(s3_srv.fs(), dest)

    with pytest.raises(ArtifactStoreConfigError, match="need an Airflow connection id"):
        storage_path(dest, None)  # never fall back to ambient (real AWS) credentials
    with pytest.raises(ArtifactStoreConfigError, match="carries a password"):
        storage_path(f"s3://user:pw@{s3_srv.bucket}/x", None)
    with pytest.raises(ArtifactStoreConfigError, match="connection .no_such_conn. for the artifact store does not exist"):
        artifact_fs("no_such_conn", dest)


def test_user_task_folder_from_s3_is_staged_and_checked(s3_srv, tmp_path, monkeypatch):
    """A user's lm-eval task folder given as s3://: fetched through the remote store, its data
    paths made absolute, loaded by lm-eval; a folder that is not there is refused naming it."""
    from quantpipe import pipeline
    from quantpipe.errors import PipelineError
    from quantpipe.store import Store
    from quantpipe.validation import user_tasks

    fs = s3_srv.fs()
    src = Path(__file__).resolve().parents[1] / "data" / "user_tasks"
    uri = f"s3://{s3_srv.bucket}/tests/{uuid.uuid4().hex[:10]}/my-tasks"
    fs.put(str(src) + "/", uri + "/", recursive=True)
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path / "cache"))
    store = Store.remote(fs, f"s3://{s3_srv.bucket}/tests")
    out = pipeline.validate_params({"user_tasks_uri": uri, "tasks": ["capitals"]}, store=store)
    staged = pipeline._user_tasks(uri, store)
    assert user_tasks.check(staged)["capitals"]["items"] == 120
    assert str(staged / "data" / "capitals.jsonl") in (staged / "capitals.yaml").read_text()
    assert out["evaluation"]["user_tasks_uri"] == uri
    with pytest.raises(user_tasks.UserTasksError, match="not a folder|no task YAML|could not fetch"):
        pipeline.validate_params({"user_tasks_uri": uri + "-missing"}, store=store)
    with pytest.raises(PipelineError, match="this worker's artifact store is local"):  # no remote store here
        pipeline.validate_params({"user_tasks_uri": uri}, store=Store.local())


def test_model_uri_in_s3_is_staged_verified_and_reused(s3_srv, tmp_path, model_dir):
    """model_uri s3://bucket/prefix/: a team's own upload (no manifest) is copied into the cache,
    checkpoint files only (never pickles), verified like any checkpoint and reused while unchanged;
    a folder this product published (with its manifest) is staged and verified by the manifest."""
    import shutil

    from quantpipe.errors import CheckpointError
    from quantpipe.prep.checkpoint import verify_checkpoint
    from quantpipe.prep.sources import resolve_model_uri
    from quantpipe.store import Store

    fs = s3_srv.fs()
    mine = tmp_path / "upload"
    shutil.copytree(model_dir, mine, ignore=shutil.ignore_patterns("MANIFEST.json"))
    (mine / "pytorch_model.bin").write_bytes(b"a pickle that must never be read")
    uri = f"s3://{s3_srv.bucket}/tests/{uuid.uuid4().hex[:10]}/models/smollm2/"
    fs.put(str(mine) + "/", uri, recursive=True)
    store = Store.remote(fs, f"s3://{s3_srv.bucket}/tests", env=None)
    cache = tmp_path / "cache"
    folder = resolve_model_uri(uri, cache, store)
    assert not (folder / "pytorch_model.bin").exists()
    assert verify_checkpoint(folder).checkpoint_hash == verify_checkpoint(model_dir).checkpoint_hash
    assert resolve_model_uri(uri, cache, store) == folder  # unchanged listing: reused
    fs.pipe_file(uri + "generation_config.json", b'{"do_sample": false}')
    assert resolve_model_uri(uri, cache, store) != folder  # changed: staged again
    published = store.upload(model_dir, f"published/{uuid.uuid4().hex[:8]}")  # with its manifest
    assert verify_checkpoint(resolve_model_uri(published, cache, store)).checkpoint_hash == \
        verify_checkpoint(model_dir).checkpoint_hash
    empty = f"s3://{s3_srv.bucket}/tests/{uuid.uuid4().hex[:10]}/nothing/"
    fs.pipe_file(empty + "README.md", b"no weights here")
    with pytest.raises(CheckpointError, match="no \\*.safetensors file"):
        resolve_model_uri(empty, cache, store)


def test_reports_of_an_s3_store_are_mirrored_for_the_ui(s3_srv, tmp_path, monkeypatch):
    """The reports plugin with QUANTPIPE_REMOTE_ROOT: published report folders are copied into the
    api-server's cache (complete ones only, checked against their manifests) and found as local ones."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "plugins"))
    import quantpipe_reports_store as reports

    from quantpipe.artifacts import ArtifactStore
    from quantpipe.store import Store

    fs = s3_srv.fs()
    base = f"s3://{s3_srv.bucket}/tests/{uuid.uuid4().hex[:10]}"
    store = Store.remote(fs, base)
    work = ArtifactStore(tmp_path / "work")
    for name, verdict in (("validation-fp8-20261201T101010", "FAIL"), ("remediation1-fp8-20261201T102020", "PASS")):
        with work.writing("runs", "manual__r1", name) as out:
            (out / "report.json").write_text(json.dumps({"verdict": verdict, "passed": verdict == "PASS"}))
            (out / "report.html").write_text(f"<html>{verdict}</html>")
        store.upload(work.path("runs", "manual__r1", name), f"runs/manual__r1/{name}")
    fs.pipe_file(f"{base}/runs/manual__r1/validation-fp8-20261201T103030/report.html", b"half-written")  # no manifest
    mirror = tmp_path / "mirror"
    reports.mirror_reports(store, mirror, "manual__r1")
    refs = reports.reports_for_run(mirror, "manual__r1")
    assert [r.name for r in refs] == ["remediation1-fp8-20261201T102020", "validation-fp8-20261201T101010"]
    assert reports.find_report(mirror, "manual__r1").html.read_text() == "<html>PASS</html>"
    assert [x["verdict"] for x in reports.index(reports.mirror_reports(store, tmp_path / "all"))] == ["PASS", "FAIL"]
    with pytest.raises(reports.ReportNotFound):
        reports.mirror_reports(store, mirror, "../../etc")
    # a report changed in the store after publishing no longer matches its manifest: refused
    fs.pipe_file(f"{base}/runs/manual__r1/validation-fp8-20261201T101010/report.html", b"<html>tampered</html>")
    with pytest.raises(reports.ReportNotFound, match="does not match its manifest"):
        reports.mirror_reports(store, tmp_path / "fresh", "manual__r1")
