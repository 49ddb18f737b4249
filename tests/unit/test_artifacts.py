import json

import pytest

from quantpipe.artifacts import MANIFEST, ArtifactStore, uri_to_path, verify_folder
from quantpipe.errors import ArtifactError


def test_write_is_atomic_and_verified(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writing("a", "b", meta={"k": 1}) as out:
        (out / "x.txt").write_text("hello")
        assert store.find("a", "b") is None  # not visible while being written
    folder = store.find("a", "b", deep=True)
    assert folder is not None
    m = verify_folder(folder)
    assert m["files"][0]["path"] == "x.txt" and m["meta"] == {"k": 1}
    assert uri_to_path(store.uri("a", "b")) == folder


def test_crash_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("a") as out:
            (out / "x.txt").write_text("partial")
            raise RuntimeError("killed")
    assert store.find("a") is None
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_is_never_overwritten(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writing("a") as out:
        (out / "x.txt").write_text("first")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        with store.writing("a") as out:
            (out / "x.txt").write_text("second")
    assert (tmp_path / "a" / "x.txt").read_text() == "first"


def test_corruption_and_missing_files_detected(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writing("a") as out:
        (out / "x.bin").write_bytes(b"0123456789")
    (tmp_path / "a" / "x.bin").write_bytes(b"0123456780")
    with pytest.raises(ArtifactError, match="corrupt"):
        verify_folder(tmp_path / "a")
    assert store.find("a", deep=True) is None
    (tmp_path / "a" / "x.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_folder(tmp_path / "a")


def test_leftover_without_manifest_is_replaced_but_kept_aside(tmp_path):
    store = ArtifactStore(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "half.bin").write_bytes(b"xx")
    with store.writing("a") as out:
        (out / "full.bin").write_bytes(b"yy")
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["files"][0]["path"] == "full.bin"
    assert any(p.name.startswith(".a.stale-") for p in tmp_path.iterdir())


def test_names_cannot_escape_the_store(tmp_path):
    with pytest.raises(ArtifactError, match="escapes"):
        ArtifactStore(tmp_path / "root").path("..", "x")
    with pytest.raises(ArtifactError, match="only local paths"):
        uri_to_path("http://example.com/x")
