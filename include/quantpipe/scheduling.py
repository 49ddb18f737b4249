"""Re-quantization planning: which (model, settings) entries need a new pipeline run.

Pure library (no Airflow imports). The DAGs in ``dags/llm_requantize.py`` call it:

- ``load_entries``: the configured list (Airflow Variable JSON, else a YAML file, else the
  built-in model with fp8), each entry validated through ``PipelineParams.from_flat`` so a
  bad entry fails the plan with the reason instead of failing the triggered run.
  ``config_path`` says which YAML file: ``QUANTPIPE_REQUANTIZE_CONFIG`` when set (the file must
  then exist), else the caller's default (the checkout's ``include/requantize.yaml``).
- ``fingerprint``: sha256 over the checkpoint's content hash (the same hash
  ``prep_checkpoint`` records) and the entry's fully resolved settings.
- ``RequantState``: a small JSON record in the artifact store
  (``<root>/scheduling/requantize_state.json``) of the last successful fingerprint per entry
  key, written atomically; ``plan`` skips an entry whose fingerprint equals its last
  successful one.
- ``scan_checkpoints``: content hashes of checkpoint folders under a watched directory, and
  which ones are new or changed since the last scan (for the Asset watcher).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .hashing import sha256_file, sha256_json
from .settings import DEFAULT_MODEL_URI, PipelineParams

log = logging.getLogger(__name__)

STATE_FILE = "requantize_state.json"
SCAN_FILE = "checkpoint_scan.json"
HASHED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja")  # as quantpipe.prep.checkpoint
MANIFEST = "MANIFEST.json"
DEFAULT_ENTRIES: list[dict] = [{"model_uri": DEFAULT_MODEL_URI, "method": "fp8", "bits": 8,
                                "run_name": "smollm2-fp8"}]
_KEY_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
CONFIG_ENV = "QUANTPIPE_REQUANTIZE_CONFIG"


class PlanError(ValueError):
    """The re-quantization list is unusable; the message names the entry and the problem."""


# ------------------------------------------------------------------ entries

def config_path(default: Path | None, environ: dict | None = None) -> tuple[Path | None, bool]:
    """(YAML file of the re-quantization list, whether it must exist): ``QUANTPIPE_REQUANTIZE_CONFIG``
    when set - a deployment that names a file means it, so a missing one is an error - else
    ``default`` (the single-machine checkout's ``include/requantize.yaml``, which an image may lack:
    then the built-in entries)."""
    env = os.environ if environ is None else environ
    configured = env.get(CONFIG_ENV)
    if configured:
        return Path(configured).expanduser(), True
    return (Path(default) if default is not None else None), False


def load_entries(variable_value: str | None = None, yaml_path: Path | None = None,
                 required: bool = False) -> list[dict]:
    """The configured entries: a JSON list in ``variable_value`` (an Airflow Variable), else
    ``yaml_path`` (``entries:`` list or a bare list), else ``DEFAULT_ENTRIES``. ``required``: a
    missing ``yaml_path`` is a PlanError (when the Variable is unset) instead of the defaults.
    Each entry is a dict of the main DAG's flat params (model_uri, method, bits, ...)."""
    raw: object
    source: str
    if variable_value not in (None, ""):
        source = "Variable"
        try:
            raw = json.loads(variable_value)
        except json.JSONDecodeError as e:
            raise PlanError(f"re-quantization list in the Variable is not valid JSON: {e}") from e
    elif yaml_path is not None and Path(yaml_path).is_file():
        import yaml

        source = str(yaml_path)
        try:
            raw = yaml.safe_load(Path(yaml_path).read_text())
        except yaml.YAMLError as e:
            raise PlanError(f"re-quantization list {yaml_path} is not valid YAML: {e}") from e
    elif required:
        raise PlanError(f"re-quantization list {yaml_path} does not exist ({CONFIG_ENV} names it); "
                        f"create it, point {CONFIG_ENV} at an existing file, or unset it")
    else:
        log.info("no re-quantization list at %s and no Variable: using the built-in entries %s",
                 yaml_path, DEFAULT_ENTRIES)
        return [dict(e) for e in DEFAULT_ENTRIES]
    if isinstance(raw, dict):
        raw = raw.get("entries")
    if not isinstance(raw, list) or not raw:
        raise PlanError(f"re-quantization list from {source} must be a non-empty list of param dicts")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise PlanError(f"entry {i} from {source} is {type(e).__name__}, expected a dict of params")
        out.append(validate_entry(e, i))
    keys = [entry_key(e) for e in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise PlanError(f"duplicate entries (same model, method, bits and run_name): {dupes}")
    return out


def validate_entry(entry: dict, index: int = 0) -> dict:
    """The entry with its settings checked by the pipeline's own model (raises PlanError)."""
    try:
        PipelineParams.from_flat(entry)
    except Exception as e:  # pydantic ValidationError or ValueError from a validator
        raise PlanError(f"entry {index} ({entry.get('model_uri', DEFAULT_MODEL_URI)}, "
                        f"{entry.get('method', 'fp8')}): {e}") from e
    return dict(entry)


def entry_key(entry: dict) -> str:
    """Stable, file-name-safe identity of an entry: model + method + bits + run_name."""
    p = PipelineParams.from_flat(entry)
    raw = f"{p.model_uri}|{p.quant.method}|{p.quant.bits}|{p.run_name}"
    short = _KEY_SAFE.sub("_", p.model_uri.split("://")[-1].rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{short}-{p.quant.method}{p.quant.bits}-{sha256_json(raw)[:10]}"


def resolved_settings(entry: dict) -> dict:
    """Every setting the run will use (defaults filled in), minus the run_name label."""
    d = PipelineParams.from_flat(entry).model_dump(mode="json")
    d.pop("run_name", None)
    return d


# ------------------------------------------------------------------ hashes

def checkpoint_hash(folder: Path, cache: dict | None = None) -> str:
    """Content hash of a checkpoint folder, equal to ``prep_checkpoint``'s ``checkpoint_hash``:
    sha256 of {file name: sha256} over the top-level files with the hashed suffixes.
    ``cache`` (name -> [size, mtime_ns, sha256]) avoids re-reading unchanged files; it is updated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlanError(f"{folder}: checkpoint folder not found")
    files: dict[str, str] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix in HASHED_SUFFIXES and p.name != MANIFEST):
            continue
        st = p.stat()
        ck = f"{p.resolve()}"
        hit = (cache or {}).get(ck)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            files[p.name] = hit[2]
            continue
        digest = sha256_file(p)
        files[p.name] = digest
        if cache is not None:
            cache[ck] = [st.st_size, st.st_mtime_ns, digest]
    if not files:
        raise PlanError(f"{folder}: no checkpoint files ({', '.join(HASHED_SUFFIXES)})")
    return sha256_json(files)


def fingerprint(ckpt_hash: str, entry: dict) -> str:
    """What decides whether a re-run can be skipped: checkpoint content + resolved settings."""
    return sha256_json({"checkpoint": ckpt_hash, "settings": resolved_settings(entry)})


# ------------------------------------------------------------------ state in the artifact store

def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


@dataclass
class RequantState:
    """Last successful fingerprint per entry key (plus what was triggered, for the log)."""

    path: Path
    entries: dict = field(default_factory=dict)
    hash_cache: dict = field(default_factory=dict)

    @classmethod
    def load(cls, artifact_root: Path) -> "RequantState":
        path = Path(artifact_root) / "scheduling" / STATE_FILE
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: unreadable state ({e}); delete it to re-run every entry") from e
        return cls(path, data.get("entries", {}), data.get("hash_cache", {}))

    def save(self) -> None:
        _atomic_write_json(self.path, {"version": 1, "entries": self.entries, "hash_cache": self.hash_cache})

    def last_success(self, key: str) -> str | None:
        return (self.entries.get(key) or {}).get("success_fingerprint")

    def mark_triggered(self, key: str, fp: str, run_id: str) -> None:
        e = self.entries.setdefault(key, {})
        e.update({"triggered_fingerprint": fp, "triggered_run_id": run_id,
                  "triggered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def mark_result(self, key: str, fp: str, run_id: str, state: str) -> None:
        e = self.entries.setdefault(key, {})
        e.update({"last_run_id": run_id, "last_state": state,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if state == "success":
            e["success_fingerprint"] = fp
            e["success_run_id"] = run_id


@dataclass(frozen=True)
class Decision:
    key: str
    entry: dict
    fingerprint: str
    run: bool
    reason: str

    def as_dict(self) -> dict:
        return {"key": self.key, "conf": self.entry, "fingerprint": self.fingerprint, "run": self.run,
                "reason": self.reason}


def plan(entries: list[dict], state: RequantState, resolve_checkpoint, force: bool = False) -> list[Decision]:
    """One decision per entry. ``resolve_checkpoint(model_uri) -> Path`` locates the folder
    (the DAG passes ``quantpipe.prep.sources.resolve_model_uri``)."""
    out = []
    for e in entries:
        key = entry_key(e)
        uri = e.get("model_uri") or DEFAULT_MODEL_URI
        ck = checkpoint_hash(resolve_checkpoint(uri), state.hash_cache)
        fp = fingerprint(ck, e)
        last = state.last_success(key)
        if force:
            out.append(Decision(key, e, fp, True, "forced"))
        elif last is None:
            out.append(Decision(key, e, fp, True, "no successful run recorded"))
        elif last != fp:
            out.append(Decision(key, e, fp, True, "checkpoint or settings changed since the last successful run"))
        else:
            out.append(Decision(key, e, fp, False, f"unchanged since run "
                                                   f"{state.entries[key].get('success_run_id')}"))
    return out


# ------------------------------------------------------------------ watched directory of checkpoints

def scan_checkpoints(watch_dir: Path, artifact_root: Path) -> tuple[dict[str, str], list[str]]:
    """Content hash of every checkpoint folder (has config.json) directly under ``watch_dir``,
    and the names whose hash is new or changed since the previous scan. A folder still being
    written (a ``.tmp`` / ``.partial`` / dot name, or no ``*.safetensors``) is ignored.
    The scan record lives in ``<artifact_root>/scheduling/checkpoint_scan.json``."""
    watch_dir = Path(watch_dir)
    record_path = Path(artifact_root) / "scheduling" / SCAN_FILE
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    cache = previous.get("hash_cache", {})
    hashes: dict[str, str] = {}
    if watch_dir.is_dir():
        for d in sorted(watch_dir.iterdir()):
            if (not d.is_dir() or d.name.startswith(".") or d.name.endswith((".tmp", ".partial"))
                    or not (d / "config.json").is_file() or not any(d.glob("*.safetensors"))):
                continue
            hashes[d.name] = checkpoint_hash(d, cache)
    old = previous.get("hashes", {})
    changed = [n for n, h in hashes.items() if old.get(n) != h]
    _atomic_write_json(record_path, {"version": 1, "hashes": hashes, "hash_cache": cache,
                                     "scanned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return hashes, changed


def checkpoint_asset_uri(name: str) -> str:
    """The Asset URI a new checkpoint named ``name`` is announced under."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or ".." in name:
        raise PlanError(f"checkpoint name {name!r}: letters, digits, . _ - only")
    return f"quantpipe://checkpoints/{name}"


def entries_for_checkpoints(checkpoints: list[dict], methods: list[dict] | None = None) -> list[dict]:
    """Entries for newly landed checkpoints (``{"name", "path"}`` each, as the watcher's asset
    event carries them) times the configured method settings (default: fp8)."""
    methods = methods or [{"method": "fp8", "bits": 8}]
    out = []
    for ck in checkpoints:
        name, path = ck.get("name"), ck.get("path")
        checkpoint_asset_uri(str(name))  # validates the name
        if not path:
            raise PlanError(f"checkpoint {name!r}: the event carries no path")
        for m in methods:
            e = {**m, "model_uri": Path(path).resolve().as_uri(),
                 "run_name": f"{name}-{m.get('method', 'fp8')}-{m.get('bits', 8)}bit"[:100]}
            out.append(validate_entry(e, len(out)))
    return out
