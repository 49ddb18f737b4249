"""The user's own evaluation tasks: a folder of lm-eval task YAMLs with their data files.

``stage`` copies the folder (local, or fetched from the artifact store's S3) into the cache
under a name made of its content hash, with each task's relative ``data_files`` made absolute
(lm-eval would read them relative to the worker's working directory). ``check`` refuses, naming
the file, anything that cannot be measured the way the gate compares: YAML that does not parse,
code hooks (``!function``: a task folder never runs code on the worker), data from a hub, data
files that are missing or empty, output types or metrics without a 0/1 score per item, and
names that clash with the built-in sets. It loads every task through lm-eval and counts its
items, so a broken folder is refused in ``validate_params``, before any heavy work.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from ..artifacts import ArtifactStore, uri_to_path
from ..assets.tasks import ALL_TASKS
from ..errors import PipelineError
from ..jsonl import text_rows

OUTPUT_TYPES = ("multiple_choice", "generate_until")
PER_ITEM_METRICS = ("acc", "acc_norm", "exact_match")  # 0/1 per item: paired drops with intervals
LOCAL_FORMATS = ("json", "csv", "text")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
MAX_FILES = 500
ANSWERS_FILE = "answers.jsonl"  # your prompts with their expected answers (first word or number)
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class UserTasksError(PipelineError):
    """The user's task folder cannot be measured as given; the message names the file and why."""


class _Loader(yaml.SafeLoader):
    pass


def _refuse_tag(loader, suffix, node):
    raise UserTasksError(f"uses the YAML tag !{suffix}: user tasks may not run code on the worker "
                         "(write the prompt with doc_to_text/doc_to_choice/doc_to_target templates)")


_Loader.add_multi_constructor("!", _refuse_tag)


def _yamls(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def read_yaml(path: Path) -> dict:
    try:
        cfg = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader that refuses tags
    except UserTasksError as e:
        raise UserTasksError(f"{path.name}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserTasksError(f"{path.name}: not valid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise UserTasksError(f"{path.name}: not an lm-eval task (a mapping with task, dataset_path, ...)")
    return cfg


def task_names(folder: Path) -> list[str]:
    """The task names the YAMLs in a (staged, checked) folder define."""
    return [cfg["task"] for cfg in map(read_yaml, _yamls(folder)) if isinstance(cfg.get("task"), str)]


def _content_hash(folder: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) > MAX_FILES:
        raise UserTasksError(f"{folder}: {len(files)} files; a task folder holds at most {MAX_FILES}")
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _absolute_data_files(cfg: dict, yaml_dir: Path, name: str) -> None:
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        raise UserTasksError(f"{name}: dataset_kwargs.data_files is missing: name the task's data files")
    split_files = files if isinstance(files, dict) else {"train": files}
    fixed = {}
    for split, paths in split_files.items():
        many = paths if isinstance(paths, list) else [paths]
        out = []
        for f in many:
            p = Path(str(f))
            if "://" in str(f):
                raise UserTasksError(f"{name}: data file {f} is remote; put it in the task folder beside the YAML")
            p = p if p.is_absolute() else (yaml_dir / p)
            out.append(str(p.resolve()))
        fixed[split] = out if isinstance(paths, list) else out[0]
    kwargs["data_files"] = fixed if isinstance(files, dict) else fixed["train"]
    cfg["dataset_kwargs"] = kwargs


def stage(uri: str, cache_dir: Path, fetch: Callable[[str, Path], None] | None = None) -> Path:
    """The user's task folder at ``uri``, copied under ``cache_dir/user-tasks/<content hash>``
    with data paths made absolute. ``fetch(uri, dest)`` brings a remote folder (``s3://``)."""
    if "://" in uri and not uri.startswith("file://"):
        if fetch is None:
            raise UserTasksError(f"user_tasks_uri {uri}: remote, and this worker has no remote store configured")
        tmp = cache_dir / "user-tasks" / ".incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            fetch(uri, tmp)
        except Exception as e:  # noqa: BLE001 - any transport error is the user's URI problem here
            raise UserTasksError(f"user_tasks_uri {uri}: could not fetch it ({type(e).__name__}: {e})") from e
        src = tmp
    else:
        src = uri_to_path(uri)
    if not src.is_dir():
        raise UserTasksError(f"user_tasks_uri {uri}: {src} is not a folder")
    if not _yamls(src) and not (src / ANSWERS_FILE).is_file():
        raise UserTasksError(f"user_tasks_uri {uri}: no task YAML (*.yaml) and no {ANSWERS_FILE} in {src}")
    name = _content_hash(src)
    store = ArtifactStore(cache_dir / "user-tasks")
    found = store.find(name)
    if found is not None:
        return found
    final = store.path(name)
    with store.writing(name, meta={"source": uri}) as out:
        shutil.copytree(src, out, dirs_exist_ok=True)
        for y in _yamls(out):
            cfg = read_yaml(y)
            if "task" in cfg and cfg.get("dataset_path") in LOCAL_FORMATS:
                _absolute_data_files(cfg, final / y.parent.relative_to(out), y.name)
                y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return final


def check(folder: Path) -> dict[str, dict]:
    """Every task the staged folder defines, loaded through lm-eval: name -> its YAML, output
    type, metric and item count. Raises ``UserTasksError`` naming the first problem."""
    seen: dict[str, str] = {}
    for y in _yamls(folder):
        cfg = read_yaml(y)
        name = cfg.get("task")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserTasksError(f"{y.name}: 'task' must be a name of letters, digits, '_', '.', '-' "
                                 f"(got {name!r}); task groups are not supported")
        if name in ALL_TASKS:
            raise UserTasksError(f"{y.name}: task {name} has the name of a built-in set; rename it")
        if name in seen:
            raise UserTasksError(f"{y.name}: task {name} is also defined in {seen[name]}")
        seen[name] = y.name
        if cfg.get("output_type") not in OUTPUT_TYPES:
            raise UserTasksError(f"{y.name}: output_type {cfg.get('output_type')!r} is not one of "
                                 f"{list(OUTPUT_TYPES)} (each item must score 0 or 1)")
        if cfg.get("dataset_path") not in LOCAL_FORMATS:
            raise UserTasksError(f"{y.name}: dataset_path {cfg.get('dataset_path')!r} would be fetched from a hub; "
                                 f"use one of {list(LOCAL_FORMATS)} with data files in the task folder")
        metrics = cfg.get("metric_list") or []
        first = metrics[0].get("metric") if metrics and isinstance(metrics[0], dict) else None
        if first not in PER_ITEM_METRICS:
            raise UserTasksError(f"{y.name}: the first metric in metric_list must be one of {list(PER_ITEM_METRICS)} "
                                 f"(got {first!r}): the gate compares a 0/1 score per item")
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        paths = [p for v in (files.values() if isinstance(files, dict) else [files])
                 for p in (v if isinstance(v, list) else [v]) if p]
        for p in paths:
            fp = Path(str(p))
            if not fp.is_file():
                raise UserTasksError(f"{y.name}: data file {fp.name} is missing (looked for {fp})")
            if fp.stat().st_size == 0:
                raise UserTasksError(f"{y.name}: data file {fp.name} is empty")
    answers = read_answers(folder)
    if not seen and not answers:
        raise UserTasksError(f"{folder}: no task YAML defines a task and there is no {ANSWERS_FILE}")
    out = {name: _load(folder, name, seen[name]) for name in seen}
    if answers:
        kinds = sorted({a["kind"] for a in answers})
        out[ANSWERS_FILE] = {"yaml": ANSWERS_FILE, "output_type": "answers", "items": len(answers),
                             "metric": "known answers kept (" + ", ".join(f"answers:{k}" for k in kinds) + ")",
                             "example_target": answers[0]["expected"]}
    return out


def read_answers(folder: Path) -> list[dict]:
    """``answers.jsonl``: one ``{"prompt", "answer", "kind"?}`` per line. Each prompt is answered
    greedily by baseline and candidate; an answer the baseline knows (its first word or number
    is ``answer``, confidently) and the candidate changes counts against ``answers:<kind>``
    (kind ``yours`` unless given)."""
    from .answers import first_answer

    path = folder / ANSWERS_FILE
    if not path.is_file():
        return []
    rows = []
    for i, row in text_rows(path, ANSWERS_FILE, UserTasksError, field="prompt"):
        expected = first_answer(str(row.get("answer", "")))
        if not expected:
            raise UserTasksError(f"{ANSWERS_FILE} line {i}: 'answer' must start with a word or number")
        kind = row.get("kind", "yours")
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise UserTasksError(f"{ANSWERS_FILE} line {i}: kind {kind!r} must be a lower-case name")
        rows.append({"prompt": row["prompt"], "expected": expected, "kind": kind})
    return rows


def _load(folder: Path, name: str, yaml_name: str) -> dict:
    """Build the task's documents with lm-eval (offline): the YAML's fields and data must agree."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    try:
        task = TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]
        docs = list(task.eval_docs)
        if not docs:
            raise UserTasksError(f"{yaml_name}: task {name} has no items in its test split")
        doc = docs[0]
        text = task.doc_to_text(doc)
        if task.config.output_type == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if not isinstance(choices, list) or len(choices) < 2:
                raise UserTasksError(f"{yaml_name}: task {name}: doc_to_choice gives {choices!r}, need 2 or more")
        target = task.doc_to_target(doc)
    except UserTasksError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; all mean "cannot load"
        raise UserTasksError(f"{yaml_name}: lm-eval cannot load task {name}: {type(e).__name__}: "
                             f"{str(e)[:300]}") from e
    if not isinstance(text, str) or not text:
        raise UserTasksError(f"{yaml_name}: task {name}: doc_to_text gives no prompt for its first item")
    return {"yaml": yaml_name, "output_type": task.config.output_type, "items": len(docs),
            "metric": task.config.metric_list[0]["metric"], "example_target": str(target)[:80]}
