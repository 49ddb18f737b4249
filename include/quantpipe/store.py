"""The artifact store a stage reads and writes through, handed to it explicitly.

Local (one machine): stages write straight into the store's folder and hand out ``file://``
URIs. Remote (S3 through fsspec, what a deployment with several workers uses): stages write
into a local work folder under the cache, each finished artifact folder is uploaded (its
manifest last) and the remote URI handed out; inputs given as remote URIs are staged into
the cache, keyed and verified by their manifest. The DAG side builds one per task
(``plugins/quantpipe_storage.task_store``) and passes it to the stage it calls.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .artifacts import ArtifactStore, path_to_uri, uri_to_path
from .errors import PipelineError
from .settings import Environment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Store:
    artifact_root: Path  # the local store (single machine), or unused when remote
    cache_dir: Path
    fs: object | None = None  # an fsspec filesystem for the remote store
    base: str | None = None  # the remote store's root URI, e.g. s3://bucket/quantpipe

    @classmethod
    def local(cls, env: Environment | None = None) -> "Store":
        env = env or Environment.from_env()
        return cls(artifact_root=env.artifact_root, cache_dir=env.cache_dir)

    @classmethod
    def remote(cls, fs, base: str, env: Environment | None = None) -> "Store":
        if not base or "://" not in base:
            raise PipelineError(f"a remote artifact store needs a URI such as s3://bucket/prefix, got {base!r}")
        env = env or Environment.from_env()
        return cls(artifact_root=env.artifact_root, cache_dir=env.cache_dir, fs=fs, base=base.rstrip("/"))

    @property
    def is_remote(self) -> bool:
        return self.fs is not None

    @property
    def work(self) -> ArtifactStore:
        """Where stages write: the store itself, or a local work folder when the store is remote."""
        return ArtifactStore(self.cache_dir / "work" if self.is_remote else self.artifact_root)

    def upload(self, local: Path, rel: str) -> str:
        """``local`` uploaded to ``<base>/<rel>`` (skipped when already complete there); its URI."""
        from .objectstore import is_complete, upload_folder

        dest = f"{self.base}/{rel}"
        if is_complete(self.fs, dest):
            log.info("%s is already complete in the artifact store; skipping the upload", dest)
        else:
            upload_folder(local, self.fs, dest)
        return dest

    def publish(self, local: Path) -> str:
        """URI of a finished artifact folder in the work store, uploaded first when remote."""
        if not self.is_remote:
            return path_to_uri(local)
        return self.upload(local, local.resolve().relative_to(self.work.root.resolve()).as_posix())

    def local_path(self, uri: str) -> Path:
        """A local folder for an artifact URI (remote ones are staged into the cache and verified)."""
        if "://" not in uri or uri.startswith("file://"):
            return uri_to_path(uri)
        if not self.is_remote:
            raise PipelineError(f"{uri} is remote but this worker's artifact store is local "
                                f"({self.artifact_root}): set QUANTPIPE_REMOTE_ROOT and QUANTPIPE_REMOTE_CONN")
        from .objectstore import stage_folder

        return stage_folder(self.fs, uri, self.cache_dir / "staged")

    def fetch_folder(self, uri: str, dest: Path) -> None:
        """Copy a remote folder that has no manifest (a user's task folder) into ``dest``."""
        if not self.is_remote:
            raise PipelineError(f"{uri} is remote but this worker's artifact store is local")
        self.fs.get(uri.rstrip("/") + "/", str(dest) + "/", recursive=True)

    def write_pointer(self, rel: str, record: dict) -> str:
        """A small JSON record at ``rel`` (e.g. approved/<run_name>.json), replaced atomically."""
        body = json.dumps(record, indent=1)
        if self.is_remote:
            uri = f"{self.base}/{rel}"
            self.fs.pipe_file(uri, body.encode())
            return uri
        path = self.artifact_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, path)
        return path_to_uri(path)

    def read_text(self, uri: str) -> str:
        """A small file's text by URI (a report, a record), local or remote."""
        if "://" not in uri or uri.startswith("file://"):
            return uri_to_path(uri).read_text()
        if not self.is_remote:
            raise PipelineError(f"{uri} is remote but this worker's artifact store is local")
        return self.fs.cat_file(uri).decode()
