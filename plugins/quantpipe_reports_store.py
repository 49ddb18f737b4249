"""Read-only, path-safe lookup of validation reports in the local artifact store.

No Airflow imports: the reports plugin (``quantpipe_reports``) serves what this module finds,
and unit tests exercise it directly.

Layout written by ``quantpipe.pipeline.run_validation``:
``<root>/runs/<safe_run_id(run_id)>/<label>-<method>-<YYYYmmddTHHMMSS>/report.{json,html}``
with ``<label>`` ``validation`` or ``remediation<N>``-style names. Every lookup goes through
``safe_run_id`` and a strict name pattern, and the resolved path must stay under
``<root>/runs``: anything else is refused with ``ReportNotFound`` (never a path outside the store).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantpipe.pipeline import safe_run_id

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# A report folder name: label-method-timestamp, letters/digits/._- only, no leading dot.
_REPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*-[A-Za-z0-9]+-\d{8}T\d{6}$")
_RUN_DIR = re.compile(r"^[A-Za-z0-9._-]{1,120}$")


class ReportNotFound(LookupError):
    """No such report in the store (or the request pointed outside it)."""


@dataclass(frozen=True)
class ReportRef:
    run_dir: str          # safe_run_id(run_id)
    name: str             # report folder name
    folder: Path

    @property
    def html(self) -> Path:
        return self.folder / REPORT_HTML

    @property
    def json(self) -> Path:
        return self.folder / REPORT_JSON

    @property
    def timestamp(self) -> str:
        return self.name.rsplit("-", 1)[-1]

    def summary(self) -> dict:
        """Small dict for indexes: verdict, failed checks, method, scheme (read from report.json)."""
        out = {"run_dir": self.run_dir, "name": self.name, "timestamp": self.timestamp}
        try:
            data = json.loads(self.json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return {**out, "error": f"unreadable report.json: {e.__class__.__name__}"}
        q = data.get("quantization") or {}
        return {**out, "passed": data.get("passed"), "failed_checks": data.get("failed_checks", []),
                "verdict": data.get("verdict"), "inconclusive_checks": data.get("inconclusive_checks", []),
                "method": q.get("method"), "scheme": q.get("scheme"), "run_id": data.get("run_id")}


def artifact_root() -> Path:
    """The local store root, as the pipeline resolves it (``QUANTPIPE_ARTIFACT_ROOT``)."""
    from quantpipe.settings import Environment

    return Environment.from_env().artifact_root


def _runs_root(root: Path) -> Path:
    return (Path(root) / "runs").resolve()


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent)
    except ValueError:
        return False
    return True


def run_folder(root: Path, run_id: str) -> Path:
    """``<root>/runs/<safe_run_id(run_id)>``; refuses ids that would leave ``runs/``."""
    if not run_id or len(run_id) > 250:
        raise ReportNotFound("empty or overlong run id")
    rid = safe_run_id(run_id)
    if rid in (".", "..") or not _RUN_DIR.match(rid) or rid.startswith("."):
        raise ReportNotFound(f"run id {run_id!r} does not name a run folder")
    runs = _runs_root(root)
    folder = runs / rid
    if not _inside(folder, runs) or folder.resolve().parent != runs:
        raise ReportNotFound(f"run id {run_id!r} resolves outside the store")
    return folder


def _refs(root: Path, folder: Path) -> list[ReportRef]:
    runs = _runs_root(root)
    if not folder.is_dir():
        return []
    refs = []
    for child in folder.iterdir():
        if (_REPORT_NAME.match(child.name) and child.is_dir() and not child.is_symlink()
                and _inside(child, runs) and (child / REPORT_HTML).is_file()):
            refs.append(ReportRef(folder.name, child.name, child))
    # newest first: the timestamp is the last name component
    return sorted(refs, key=lambda r: (r.timestamp, r.name), reverse=True)


def reports_for_run(root: Path, run_id: str) -> list[ReportRef]:
    """All complete reports of a run, newest first (validation and remediation attempts)."""
    return _refs(root, run_folder(root, run_id))


def find_report(root: Path, run_id: str, name: str | None = None) -> ReportRef:
    """One report of a run: ``name`` (exact folder name) or, without it, the newest one."""
    if name is not None and not _REPORT_NAME.match(name):
        raise ReportNotFound(f"{name!r} is not a report name")
    refs = reports_for_run(root, run_id)
    if not refs:
        raise ReportNotFound(f"no validation report for run {run_id!r} in the store")
    if name is None:
        return refs[0]
    for r in refs:
        if r.name == name:
            return r
    raise ReportNotFound(f"run {run_id!r} has no report {name!r}")


def report_from_uri(root: Path, uri: str) -> tuple[str, str] | None:
    """(run folder, report name) for a report URI/path inside the store, else None.

    Accepts what ``run_validation`` returns (``report_folder_uri``, ``report_html_uri``...)."""
    from urllib.parse import unquote, urlparse

    if not uri:
        return None
    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri) if "://" not in uri \
        else Path(unquote(urlparse(uri).path))
    if path.name in (REPORT_HTML, REPORT_JSON):
        path = path.parent
    parts = path.parts
    if len(parts) < 3 or parts[-3] != "runs" or not _REPORT_NAME.match(parts[-1]) \
            or not _RUN_DIR.match(parts[-2]):
        return None
    return parts[-2], parts[-1]


def index(root: Path, limit: int = 200) -> list[dict]:
    """Newest reports across all runs (one entry per report), newest first."""
    runs = _runs_root(root)
    if not runs.is_dir():
        return []
    refs: list[ReportRef] = []
    with os.scandir(runs) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False) and _RUN_DIR.match(entry.name) \
                    and not entry.name.startswith("."):
                refs.extend(_refs(root, runs / entry.name))
    refs.sort(key=lambda r: (r.timestamp, r.name), reverse=True)
    return [r.summary() for r in refs[:limit]]


def mirror_reports(artifacts, local_root: Path, run_id: str | None = None, limit: int = 200) -> Path:
    """With a remote artifact store (``quantpipe.store.Store`` on S3), copy the published report
    folders (one run's, or the newest ``limit`` of all runs) into ``local_root/runs/...`` and return
    ``local_root``, so every lookup above serves them unchanged (same names, same path checks).
    Only complete folders are copied (their manifest lists report.json and report.html, and the
    copy must match its sizes); a folder already mirrored is not fetched again."""
    fs, base = artifacts.fs, artifacts.base
    runs_uri = f"{base}/runs"

    def names(uri: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(uri, detail=False)]
        except FileNotFoundError:
            return []

    if run_id is not None:
        rids = [run_folder(local_root, run_id).name]
    else:
        rids = [r for r in names(runs_uri) if _RUN_DIR.match(r) and not r.startswith(".")]
    wanted = []
    for rid in rids:
        wanted += [(rid, n) for n in names(f"{runs_uri}/{rid}") if _REPORT_NAME.match(n)]
    wanted.sort(key=lambda x: (x[1].rsplit("-", 1)[-1], x[1]), reverse=True)
    for rid, name in wanted[:limit]:
        dest = _runs_root(local_root) / rid / name
        if (dest / REPORT_HTML).is_file():
            continue
        src = f"{runs_uri}/{rid}/{name}"
        try:
            manifest = json.loads(fs.cat_file(f"{src}/MANIFEST.json"))
        except FileNotFoundError:
            continue  # not complete (still uploading, or a writer that died): not served
        files = {f["path"]: f.get("sha256") for f in manifest.get("files", []) if isinstance(f, dict)}
        if not {REPORT_HTML, REPORT_JSON} <= set(files):
            continue
        tmp = dest.parent / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        for fname in (REPORT_HTML, REPORT_JSON):
            fs.get_file(f"{src}/{fname}", str(tmp / fname))
            if hashlib.sha256((tmp / fname).read_bytes()).hexdigest() != files[fname]:
                raise ReportNotFound(f"report {rid}/{name}: {fname} does not match its manifest")
        os.replace(tmp, dest)
    return local_root
