"""Where a checkpoint comes from: ``model_uri`` resolved to a local folder on this worker.

- ``builtin://NAME``: the small model built offline (``assets.model``);
- a path or ``file://``: a folder on this worker;
- ``s3://bucket/prefix/``: a folder in the artifact store's S3 (the worker's remote store and its
  connection). A folder published by this product (with its manifest) is staged and verified
  by the manifest; any other folder (a team's own upload) is copied into the cache under a key
  made of its listing (names, sizes, ETags), only the files a checkpoint is read from
  (``CHECKPOINT_FILES``: never pickles or code), then verified like any checkpoint;
- ``hf://org/name`` or ``hf://org/name@revision``: a Hugging Face Hub repository through
  ``huggingface_hub.snapshot_download``, the same files only. With ``HF_HUB_OFFLINE=1`` (the
  default here: workers have no hub) it resolves from the worker's hub cache or mirror
  (``HF_HUB_CACHE``); online, a token is used when given (an Airflow connection, never XCom).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

from ..artifacts import MANIFEST, ArtifactStore, uri_to_path
from ..assets.model import builtin_checkpoint
from ..errors import CheckpointError
from ..hashing import sha256_json
from ..settings import HF_ID, check_model_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                    "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model",
                    "chat_template.jinja", "chat_template.json", "SHA256SUMS", MANIFEST)

def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in CHECKPOINT_FILES)


def resolve_model_uri(uri: str, cache_dir: Path, store=None, hf_token: str | None = None) -> Path:
    """A local checkpoint folder for ``uri``; ``store`` (``store.Store``) reads ``s3://``."""
    check_model_uri(uri)
    if uri.startswith("builtin://"):
        return builtin_checkpoint(uri.removeprefix("builtin://"), cache_dir)
    if uri.startswith("hf://"):
        return from_hub(uri, hf_token)
    if uri.startswith("s3://"):
        return from_s3(uri, cache_dir, store)
    path = uri_to_path(uri)
    if not path.is_dir():
        raise CheckpointError(f"model_uri {uri!r}: {path} is not a folder")
    return path


def from_hub(uri: str, token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, revision = HF_ID.match(uri).groups()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(repo_id, revision=revision or "main", local_files_only=offline, token=token,
                                   allow_patterns=list(CHECKPOINT_FILES))
    except LocalEntryNotFoundError as e:
        where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "the default hub cache"
        raise CheckpointError(f"model_uri {uri!r}: not in this worker's hub cache ({where}) and the hub is offline "
                              "here (HF_HUB_OFFLINE=1): mount a cache or mirror that holds it, or stage it to "
                              "s3:// and use that URI") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"model_uri {uri!r}: no such repository, or it needs a token "
                              "(set the worker's Hugging Face connection)") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"model_uri {uri!r}: the hub answered {e}") from e
    log.info("model %s resolved from the hub cache: %s", uri, folder)
    return Path(folder)


def from_s3(uri: str, cache_dir: Path, store) -> Path:
    if store is None or not getattr(store, "is_remote", False):
        raise CheckpointError(f"model_uri {uri!r}: this worker has no S3 artifact store configured "
                              "(QUANTPIPE_REMOTE_ROOT and QUANTPIPE_REMOTE_CONN); s3:// checkpoints are read "
                              "through its connection")
    fs, prefix = store.fs, uri.rstrip("/")
    try:
        listing = fs.find(prefix, detail=True)
    except (OSError, PermissionError) as e:
        raise CheckpointError(f"model_uri {uri!r}: cannot list it ({type(e).__name__}: {e})") from e
    base = prefix.split("://", 1)[1]
    files = {k.split("://", 1)[-1][len(base) + 1:]: v for k, v in listing.items()
             if k.split("://", 1)[-1].startswith(base + "/")}
    if MANIFEST in files:  # published by this product: staged and verified by its manifest
        return store.local_path(uri)
    wanted = {name: info for name, info in files.items() if "/" not in name and _wanted(name)}
    if not any(n.endswith(".safetensors") for n in wanted):
        raise CheckpointError(f"model_uri {uri!r}: no *.safetensors file in it (found {sorted(files)[:10]}); "
                              "only safetensors checkpoints are read")
    key = sha256_json({"uri": prefix, "files": {n: [i.get("size"), i.get("ETag") or i.get("etag")]
                                                for n, i in sorted(wanted.items())}})[:24]
    local = ArtifactStore(cache_dir / "models-s3")
    found = local.find(key)
    if found is not None:
        log.info("model %s already staged unchanged in %s", uri, found)
        return found
    with local.writing(key, meta={"source": prefix}) as out:
        for name in sorted(wanted):
            fs.get_file(f"{prefix}/{name}", str(out / name))
    log.info("model %s staged into %s (%d files)", uri, local.path(key), len(wanted))
    return local.path(key)

