"""The S3 store itself dies (SIGKILL) during an upload and comes back: the retry succeeds and
nothing corrupt or half-written is visible in the bucket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from quantpipe.objectstore import MANIFEST, ObjectStoreError, is_complete, upload_folder, verify_remote
from tests.infra.servers import pid_alive, seaweedfs_server, short_tmpdir, stop_pid

MiB = 1 << 20
UPLOADER = textwrap.dedent("""
    import os, sys, s3fs
    from pathlib import Path
    from quantpipe.objectstore import upload_folder
    fs = s3fs.S3FileSystem(key=os.environ["T_KEY"], secret=os.environ["T_SECRET"], endpoint_url=os.environ["T_ENDPOINT"],
                           skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}},
                           connect_timeout=2, read_timeout=5)
    upload_folder(Path(sys.argv[1]), fs, sys.argv[2], block_size=5 << 20)
    print("UPLOAD FINISHED", flush=True)
""")


def _restart(cmdline: list[str], cwd: str) -> subprocess.Popen:
    return subprocess.Popen(cmdline, cwd=cwd, stdout=open(Path(cwd) / "weed-restart.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_store_killed_mid_upload_then_restarted(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    with open(src / "model.safetensors", "wb") as f:
        for _ in range(60):
            f.write(os.urandom(MiB))
    work = short_tmpdir("qp-s3-outage-")
    restarted = None
    with seaweedfs_server(work) as s3:
        fs = s3.fs()
        dest = f"s3://{s3.bucket}/outage/{uuid.uuid4().hex[:8]}/quantized"
        cmdline = Path(f"/proc/{s3.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        cwd = os.readlink(f"/proc/{s3.pid}/cwd")
        env = {**os.environ, "T_KEY": s3.access_key, "T_SECRET": s3.secret_key, "T_ENDPOINT": s3.endpoint}
        up = subprocess.Popen([sys.executable, "-c", UPLOADER, str(src), dest], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.5)  # the upload is under way (60 MiB in 5 MiB parts)
        os.killpg(s3.pid, signal.SIGKILL)  # the store dies, not the client
        out = up.communicate(timeout=180)[0].decode(errors="replace")
        assert up.returncode != 0 and "UPLOAD FINISHED" not in out, out[-2000:]
        try:
            restarted = _restart(cmdline, cwd)
            deadline = time.monotonic() + 60
            while True:
                try:
                    fs.invalidate_cache()
                    if fs.exists(s3.bucket):
                        break
                except Exception:  # noqa: BLE001 - store still starting
                    pass
                assert time.monotonic() < deadline, "SeaweedFS did not come back"
                time.sleep(0.5)
            # nothing that looks complete: no manifest, verification refuses it
            assert not fs.exists(f"{dest}/{MANIFEST}") and not is_complete(fs, dest)
            with pytest.raises(ObjectStoreError):
                verify_remote(fs, dest)
            # the retry clears the leftover and leaves one complete, verified artifact
            upload_folder(src, fs, dest, block_size=5 * MiB)
            manifest = verify_remote(fs, dest, deep=True)
            assert {f["path"] for f in manifest["files"]} == {"config.json", "model.safetensors"}
            fs.invalidate_cache()
            names = sorted(p.rsplit("/", 1)[1] for p in fs.find(dest))
            assert names == sorted([MANIFEST, "config.json", "model.safetensors"])
        finally:
            if restarted is not None:
                stop_pid(restarted.pid, timeout=10, group=True)
                restarted.wait(timeout=10)
    shutil.rmtree(work, ignore_errors=True)
    assert restarted is not None and not pid_alive(restarted.pid)
