"""Artifact folders that are complete or absent, never half-written.

Every artifact is a folder. It is written under a temporary sibling name, its
``MANIFEST.json`` (files, sizes, sha256) is written last, and the folder is then
renamed into place. A reader only trusts a folder whose manifest verifies.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from .errors import ArtifactError
from .hashing import sha256_file
from .procs import pid_alive

MANIFEST = "MANIFEST.json"


def uri_to_path(uri: str) -> Path:
    """``file:///x`` or a plain path -> Path. Other schemes are refused here."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        raise ArtifactError(f"{uri!r}: only local paths and file:// URIs are readable on this worker")
    return Path(uri)


def path_to_uri(path: Path) -> str:
    return path.resolve().as_uri()


def build_manifest(folder: Path, meta: dict | None = None) -> dict:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files.append({"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                          "sha256": sha256_file(p)})
    return {"version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files, "meta": meta or {}}


def verify_folder(folder: Path, deep: bool = True) -> dict:
    """Return the manifest if every listed file is present with its size (and hash)."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; the artifact is incomplete or was never written")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e})") from e
    for entry in manifest["files"]:
        p = folder / entry["path"]
        if not p.is_file():
            raise ArtifactError(f"{folder}: file {entry['path']} listed in the manifest is missing")
        if p.stat().st_size != entry["size"]:
            raise ArtifactError(f"{p}: size {p.stat().st_size} != {entry['size']} in the manifest")
        if deep:
            got = sha256_file(p)
            if got != entry["sha256"]:
                raise ArtifactError(f"{p}: sha256 {got[:16]}... does not match the manifest "
                                    f"({entry['sha256'][:16]}...); the file is corrupt")
    return manifest


class ArtifactStore:
    """Local artifact store rooted at a folder; URIs handed out are ``file://``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts).resolve()
        if not str(p).startswith(str(self.root.resolve())):
            raise ArtifactError(f"artifact name {'/'.join(parts)!r} escapes the store")
        return p

    def uri(self, *parts: str) -> str:
        return path_to_uri(self.path(*parts))

    def find(self, *parts: str, deep: bool = False) -> Path | None:
        """The folder if it holds a complete artifact, else None."""
        p = self.path(*parts)
        if not p.is_dir():
            return None
        try:
            verify_folder(p, deep=deep)
        except ArtifactError:
            return None
        return p

    @contextmanager
    def writing(self, *parts: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a scratch folder; on success it becomes the artifact, atomically.

        An existing complete artifact is never replaced. If another writer completes the
        same artifact first (two runs with the same inputs), ours is discarded and theirs
        kept. An incomplete leftover (no manifest) is moved aside, never deleted. Scratch
        folders of writers that died (killed mid-write) are removed.
        """
        final = self.path(*parts)
        if self.find(*parts) is not None:
            raise ArtifactError(f"{final} already holds a complete artifact; refusing to overwrite it")
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_scratch(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            manifest = build_manifest(tmp, meta)
            with open(tmp / (MANIFEST + ".part"), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)
            if final.exists():
                if self.find(*parts) is not None:  # another writer finished first
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                final.rename(final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(tmp, final)
            except OSError:
                if self.find(*parts) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an identical artifact
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise ArtifactError(f"no space left on the device while writing {final}; nothing was stored "
                                    "and earlier artifacts are intact: free space or point "
                                    "QUANTPIPE_ARTIFACT_ROOT at a larger volume") from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove_dead_scratch(final: Path) -> None:
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
