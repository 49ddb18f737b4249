"""Airflow side of the artifact store: connection id + URI -> fsspec filesystem.

    from quantpipe_storage import artifact_fs
    fs, uri = artifact_fs("quantpipe_s3", "s3://bucket/runs/<run_id>/quantized")
    quantpipe.objectstore.upload_folder(local_dir, fs, uri)

Credentials live only in the Airflow connection (type ``aws``; ``endpoint_url`` in its
extras for S3-compatible stores such as MinIO or SeaweedFS). ``ObjectStoragePath``'s
``str()`` embeds the connection id (``s3://conn@bucket/...``), so everything returned
here for logs and XCom is the plain ``as_uri()`` form.

The plugins folder is on ``sys.path`` for every Airflow component and worker, so DAGs
import this module by name. It registers no plugin objects.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from airflow.sdk import ObjectStoragePath

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "az")


class ArtifactStoreConfigError(ValueError):
    """The store URI or connection cannot be used; the message says why."""


def storage_path(uri: str, conn_id: str | None = None) -> ObjectStoragePath:
    """An ``ObjectStoragePath`` bound to ``conn_id``.

    A remote URI without a connection is refused: ObjectStoragePath would otherwise fall
    back to ambient cloud credentials (real AWS), which is never what a test or an
    on-prem store wants. ``s3://conn@bucket/...`` (the ``str()`` form) is accepted too.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme or "file"
    if parts.password is not None:
        raise ArtifactStoreConfigError("the store URI carries a password; put credentials in the "
                                       "Airflow connection and pass its id instead")
    embedded = parts.username
    if embedded and conn_id and embedded != conn_id:
        raise ArtifactStoreConfigError(f"URI names connection {embedded!r} but conn_id is {conn_id!r}")
    conn_id = conn_id or embedded
    if scheme in REMOTE_SCHEMES and not conn_id:
        raise ArtifactStoreConfigError(f"{scheme}:// artifact stores need an Airflow connection id "
                                       "(conn_id); none was given")
    return ObjectStoragePath(uri, conn_id=conn_id) if scheme != "file" else ObjectStoragePath(uri)


def _check_connection(conn_id: str, scheme: str) -> None:
    """The connection must exist: the Amazon provider silently falls back to ambient boto3
    credentials or anonymous access when it does not (a typo would then talk to real AWS)."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as e:  # AirflowNotFoundException (its module moved between versions)
        raise ArtifactStoreConfigError(f"Airflow connection {conn_id!r} for the artifact store does not "
                                       f"exist ({type(e).__name__}); create it (type aws, endpoint_url "
                                       "in extras for S3-compatible stores)") from None
    if scheme in ("s3", "s3a") and conn.conn_type != "aws":
        raise ArtifactStoreConfigError(f"Airflow connection {conn_id!r} has type {conn.conn_type!r}; "
                                       "s3:// artifact stores need an 'aws' connection")


def artifact_fs(conn_id: str | None, uri: str):
    """``(filesystem, plain_uri)`` for ``quantpipe.objectstore``; plain_uri has no connection id."""
    path = storage_path(uri, conn_id)
    if path.conn_id:
        _check_connection(path.conn_id, path.protocol)
    try:
        fs = path.fs
    except Exception as e:  # AirflowNotFoundException and friends: name the connection
        raise ArtifactStoreConfigError(f"cannot open {path.as_uri()} with connection {conn_id!r}: "
                                       f"{type(e).__name__}: {e}") from e
    return fs, path.as_uri()


def plain_uri(path: ObjectStoragePath | str) -> str:
    """The URI to log or put in XCom (never ``str(ObjectStoragePath)``, which embeds the conn id)."""
    if isinstance(path, ObjectStoragePath):
        return path.as_uri()
    parts = urlsplit(path)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()
    return path


def task_store():
    """The artifact store a task hands to the stage it calls (``quantpipe.store.Store``): the
    remote store when the deployment sets QUANTPIPE_REMOTE_ROOT (e.g. s3://bucket/quantpipe,
    through the Airflow connection named in QUANTPIPE_REMOTE_CONN, default ``quantpipe_s3``),
    else the local store under QUANTPIPE_ARTIFACT_ROOT."""
    import os

    from quantpipe.store import Store

    root = os.environ.get("QUANTPIPE_REMOTE_ROOT")
    if not root:
        return Store.local()
    fs, plain = artifact_fs(os.environ.get("QUANTPIPE_REMOTE_CONN", "quantpipe_s3"), root)
    return Store.remote(fs, plain)
