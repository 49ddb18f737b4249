"""Artifact folders on any fsspec filesystem (S3 through s3fs, local, memory...).

An artifact is a prefix ("folder") holding data files and a ``MANIFEST.json``
(files, sizes, sha256) that is written LAST, in one PUT. A reader trusts a prefix only
when its manifest exists and verifies, so an upload that dies half-way (process killed,
network lost) leaves a prefix without a manifest: it never looks complete, and the next
``upload_folder`` clears it and starts again.

Files stream in chunks: s3fs turns every file larger than ``block_size`` into a multipart
upload, and memory stays bounded by about two blocks whatever the checkpoint size. An
unfinished multipart upload is not an object, so a killed upload leaves no half file.

No Airflow import here: callers pass the filesystem (``ObjectStoragePath(...).fs`` in a
task, ``s3fs.S3FileSystem(...)`` elsewhere) and a destination such as
``s3://bucket/runs/<run>/quantized`` or ``bucket/runs/<run>/quantized``. Only such URIs are
logged; the filesystem object (which holds credentials) never is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
BLOCK_SIZE = 16 << 20  # bytes per multipart part and per read; s3fs needs >= 5 MiB
MANIFEST_VERSION = 1


class ObjectStoreError(ArtifactError):
    """A remote artifact is missing, incomplete, corrupt or cannot be written."""


class ObjectStoreAccessError(ObjectStoreError):
    """The store refused the credentials (wrong key or secret, or no permission)."""


# ---------------------------------------------------------------------------- helpers
def _strip(fs, uri: str) -> str:
    """Filesystem-internal path (no protocol, no trailing slash)."""
    return fs._strip_protocol(uri).rstrip("/")


def _protocol(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def display_uri(fs, path: str) -> str:
    """``s3://bucket/key`` for logs and errors (never credentials)."""
    path = _strip(fs, path)
    proto = _protocol(fs)
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _access_error(fs, path: str, action: str, exc: BaseException) -> ObjectStoreAccessError:
    return ObjectStoreAccessError(
        f"{action} {display_uri(fs, path)} was refused by the object store: {exc}. "
        "Check the access key id and secret key of the connection (and the bucket policy)."
    )


def manifest_digest(manifest: dict) -> str:
    """Hash of the manifest's content (file list with sizes and hashes), not its timestamp.

    Two uploads of identical files share a digest; it keys the local staging cache.
    """
    files = sorted((f["path"], int(f["size"]), f["sha256"]) for f in manifest["files"])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _local_files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise ObjectStoreError(f"{p}: symlinks are not uploaded; copy the file into the artifact")
        if p.is_file() and p.name != MANIFEST and ".part" not in p.suffixes:
            out.append(p)
    return out


def _read_manifest(fs, base: str) -> dict:
    mpath = f"{base}/{MANIFEST}"
    try:
        raw = fs.cat_file(mpath)
    except FileNotFoundError:
        raise ObjectStoreError(
            f"{display_uri(fs, base)}: no {MANIFEST}; the artifact is incomplete or was never written"
        ) from None
    except PermissionError as e:
        raise _access_error(fs, mpath, "reading", e) from e
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest.get("files"), list):
            raise ValueError("no 'files' list")
        for f in manifest["files"]:
            if not {"path", "size", "sha256"} <= set(f):
                raise ValueError(f"entry {f!r} lacks path/size/sha256")
    except (ValueError, AttributeError) as e:
        raise ObjectStoreError(f"{display_uri(fs, mpath)}: unreadable manifest ({e})") from e
    return manifest


def _remote_sha256(fs, path: str, block_size: int) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=block_size) as f:
        while chunk := f.read(block_size):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- public API
def is_complete(fs, dest: str, deep: bool = False) -> bool:
    """True when ``dest`` holds a manifest and every listed file (sizes; hashes if deep).

    Access errors are raised, not reported as "incomplete": a wrong key must not look like
    a missing artifact.
    """
    try:
        verify_remote(fs, dest, deep=deep)
    except ObjectStoreAccessError:
        raise
    except ObjectStoreError:
        return False
    return True


def verify_remote(fs, dest: str, deep: bool = True, block_size: int = BLOCK_SIZE) -> dict:
    """Return the manifest of ``dest`` after checking every file's presence and size, and
    (``deep=True``) its sha256, streamed. Raises ``ObjectStoreError`` naming the problem."""
    base = _strip(fs, dest)
    manifest = _read_manifest(fs, base)
    try:
        for entry in manifest["files"]:
            p = f"{base}/{entry['path']}"
            try:
                size = fs.info(p)["size"]
            except FileNotFoundError:
                raise ObjectStoreError(
                    f"{display_uri(fs, base)}: file {entry['path']} listed in the manifest is missing"
                ) from None
            if int(size) != int(entry["size"]):
                raise ObjectStoreError(
                    f"{display_uri(fs, p)}: size {size} != {entry['size']} in the manifest"
                )
            if deep:
                got = _remote_sha256(fs, p, block_size)
                if got != entry["sha256"]:
                    raise ObjectStoreError(
                        f"{display_uri(fs, p)}: sha256 {got[:16]}... does not match the manifest "
                        f"({entry['sha256'][:16]}...); the object is corrupt"
                    )
    except PermissionError as e:
        raise _access_error(fs, base, "reading", e) from e
    return manifest


def upload_folder(local: Path, fs, dest: str, meta: dict | None = None, *,
                  overwrite: bool = False, block_size: int = BLOCK_SIZE) -> dict:
    """Stream every file of ``local`` to ``dest``, then write ``MANIFEST.json`` last.

    - ``dest`` already complete: ``ObjectStoreError`` unless ``overwrite`` (then its manifest
      is deleted first, so readers never see a manifest over half-replaced files).
    - ``dest`` holding a leftover without a manifest (a crashed upload): cleared first.
    - A ``MANIFEST.json`` inside ``local`` (a local artifact) is checked against the bytes
      streamed, and its ``meta`` is kept unless ``meta`` is given.
    Returns the manifest written.
    """
    local = Path(local)
    if not local.is_dir():
        raise ObjectStoreError(f"{local}: not a folder; upload_folder uploads artifact folders")
    if block_size < (5 << 20) and _protocol(fs) in ("s3", "s3a"):
        raise ObjectStoreError(f"block_size {block_size} is below the S3 multipart minimum of 5 MiB")
    base = _strip(fs, dest)
    shown = display_uri(fs, base)
    local_manifest = None
    if (local / MANIFEST).is_file():
        local_manifest = {f["path"]: f for f in json.loads((local / MANIFEST).read_text())["files"]}
        if meta is None:
            meta = json.loads((local / MANIFEST).read_text()).get("meta")
    files = _local_files(local)
    if not files:
        raise ObjectStoreError(f"{local}: empty folder; nothing to upload")

    try:
        if fs.exists(f"{base}/{MANIFEST}"):
            if is_complete(fs, base) and not overwrite:
                raise ObjectStoreError(f"{shown} already holds a complete artifact; refusing to "
                                       "overwrite it (check is_complete() first to skip the work)")
            fs.rm_file(f"{base}/{MANIFEST}")  # readers stop trusting the prefix before it changes
            log.info("replacing %s: its manifest was removed first", shown)
        fs.invalidate_cache(base)
        if fs.exists(base):
            log.warning("%s holds a leftover without a manifest (an interrupted upload); clearing it", shown)
            fs.rm(base, recursive=True)
            fs.invalidate_cache(base)

        local_fs = _protocol(fs) in ("file", "local")
        entries = []
        t0 = time.monotonic()
        total = 0
        for p in files:
            rel = p.relative_to(local).as_posix()
            h = hashlib.sha256()
            size = 0
            if local_fs:
                fs.makedirs(fs._parent(f"{base}/{rel}"), exist_ok=True)
            with open(p, "rb") as src, fs.open(f"{base}/{rel}", "wb", block_size=block_size) as dst:
                while chunk := src.read(block_size):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            digest = h.hexdigest()
            if local_manifest is not None:
                want = local_manifest.get(rel)
                if want is None or want["sha256"] != digest or int(want["size"]) != size:
                    raise ObjectStoreError(f"{p}: does not match the local {MANIFEST}; "
                                           "the local artifact changed or is corrupt; not publishing it")
            entries.append({"path": rel, "size": size, "sha256": digest})
            total += size
        if local_manifest is not None and set(local_manifest) != {e["path"] for e in entries}:
            missing = sorted(set(local_manifest) - {e["path"] for e in entries})
            raise ObjectStoreError(f"{local}: files listed in its {MANIFEST} are missing: {missing[:5]}")

        # Every data file is in place: check sizes remotely before declaring the artifact complete.
        fs.invalidate_cache(base)
        for e in entries:
            got = fs.info(f"{base}/{e['path']}")["size"]
            if int(got) != e["size"]:
                raise ObjectStoreError(f"{display_uri(fs, base + '/' + e['path'])}: stored size {got} "
                                       f"!= {e['size']} uploaded")
        manifest = {"version": MANIFEST_VERSION,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": entries, "meta": meta or {}}
        fs.pipe_file(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    except PermissionError as e:
        raise _access_error(fs, base, "writing", e) from e
    log.info("uploaded %d files (%.1f MB) to %s in %.1f s; manifest written last",
             len(entries), total / 1e6, shown, time.monotonic() - t0)
    return manifest


def stage_folder(fs, src: str, cache_dir: Path, *, block_size: int = BLOCK_SIZE) -> Path:
    """A local copy of the artifact at ``src``, in ``cache_dir/<manifest digest>``.

    Downloads stream into a temporary sibling, every file's sha256 is checked against the
    manifest, then the folder is renamed into place. A copy already staged under the same
    digest is reused without touching the store's data files.
    """
    base = _strip(fs, src)
    shown = display_uri(fs, base)
    manifest = _read_manifest(fs, base)  # a cache hit needs nothing else from the store
    key = manifest_digest(manifest)
    cache_dir = Path(cache_dir)
    target = cache_dir / key
    if _cached_ok(target, manifest):
        log.info("staging %s: reusing the cached copy %s", shown, target)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        for entry in manifest["files"]:
            rel = entry["path"]
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ObjectStoreError(f"{shown}: manifest path {rel!r} escapes the artifact")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            try:
                with fs.open(f"{base}/{rel}", "rb", block_size=block_size) as r, open(out, "wb") as w:
                    while chunk := r.read(block_size):
                        h.update(chunk)
                        w.write(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                raise ObjectStoreError(f"{shown}: file {rel} listed in the manifest is missing") from None
            if size != int(entry["size"]) or h.hexdigest() != entry["sha256"]:
                raise ObjectStoreError(
                    f"{display_uri(fs, base + '/' + rel)}: downloaded {size} bytes with sha256 "
                    f"{h.hexdigest()[:16]}..., the manifest says {entry['size']} bytes and "
                    f"{entry['sha256'][:16]}...; the object is corrupt or changed during the download"
                )
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if _cached_ok(target, manifest):  # another stager won the race: same content
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                if target.exists():  # a damaged leftover: keep it aside, then take its place
                    target.rename(cache_dir / f".{key}.stale-{uuid.uuid4().hex[:8]}")
                os.rename(tmp, target)
    except PermissionError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _access_error(fs, base, "reading", e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("staged %s into %s (%d files) in %.1f s", shown, target, len(manifest["files"]),
             time.monotonic() - t0)
    return target


def _cached_ok(target: Path, manifest: dict[str, Any]) -> bool:
    """The cached copy is trusted if its manifest matches and every file has its size
    (hashes were checked when it was staged; the name is the content digest)."""
    mf = target / MANIFEST
    if not mf.is_file():
        return False
    try:
        cached = json.loads(mf.read_text())
    except ValueError:
        return False
    if manifest_digest(cached) != manifest_digest(manifest):
        return False
    for entry in manifest["files"]:
        p = target / entry["path"]
        if not p.is_file() or p.stat().st_size != int(entry["size"]):
            return False
    return True
