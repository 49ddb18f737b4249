"""Faults injected for real: a writer SIGKILLed mid-write, a full disk, two writers at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from quantpipe.artifacts import ArtifactStore, verify_folder
from quantpipe.errors import ArtifactError

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from quantpipe.artifacts import ArtifactStore
    root, mb, pause = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    with ArtifactStore(root).writing("quantized", "model-x") as out:
        with open(out / "model.safetensors", "wb") as f:
            for i in range(mb):
                f.write(b"\\x01" * (1 << 20))
                f.flush()
                if i == 2:
                    print("WRITING", flush=True)
                time.sleep(pause)
        (out / "config.json").write_text("{}")
    print("DONE", flush=True)
""")


def _writer(root: Path, mb: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(mb), str(pause)],
                            stdout=subprocess.PIPE, text=True)


def test_writer_killed_mid_write_leaves_nothing_complete_and_a_retry_completes(tmp_path):
    store = ArtifactStore(tmp_path)
    p = _writer(tmp_path, 64, 0.05)
    assert p.stdout.readline().strip() == "WRITING"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert store.find("quantized", "model-x") is None
    assert not (tmp_path / "quantized" / "model-x").exists()
    leftovers = list((tmp_path / "quantized").glob(".model-x.tmp-*"))
    assert len(leftovers) == 1  # hidden scratch of the dead writer, never mistaken for the artifact
    retry = _writer(tmp_path, 4, 0.0)
    assert retry.wait(timeout=120) == 0
    folder = store.find("quantized", "model-x", deep=True)
    assert folder is not None
    manifest = verify_folder(folder)
    assert {f["path"] for f in manifest["files"]} == {"model.safetensors", "config.json"}
    assert (folder / "model.safetensors").stat().st_size == 4 << 20
    assert not list((tmp_path / "quantized").glob(".model-x.tmp-*"))  # the dead writer's scratch is gone


@pytest.fixture()
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_during_save_is_a_clear_error_and_earlier_artifacts_survive(tiny_disk):
    store = ArtifactStore(tiny_disk)
    with store.writing("calibration", "earlier") as out:
        (out / "samples.jsonl").write_text("[1, 2, 3]\n" * 1000)
    with pytest.raises(ArtifactError, match="no space left on the device while writing .*model-x.*nothing was "
                                            "stored"):
        with store.writing("quantized", "model-x") as out:
            with open(out / "model.safetensors", "wb") as f:
                for _ in range(64):
                    f.write(b"\x00" * (1 << 20))
    assert store.find("quantized", "model-x") is None
    assert not list((tiny_disk / "quantized").iterdir())  # scratch removed, space given back
    verify_folder(store.find("calibration", "earlier"))


def test_two_writers_of_the_same_artifact_at_once_leave_one_complete_copy(tmp_path):
    store = ArtifactStore(tmp_path)
    barrier = threading.Barrier(2)
    errors = []

    def write(tag: str):
        try:
            with store.writing("quantized", "same-inputs") as out:
                (out / "model.safetensors").write_bytes(b"identical content" * 1000)
                barrier.wait(timeout=30)  # both are mid-write before either finishes
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    folder = store.find("quantized", "same-inputs", deep=True)
    assert folder is not None
    assert sorted(p.name for p in (tmp_path / "quantized").iterdir()) == ["same-inputs"]
