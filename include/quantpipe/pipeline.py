"""The stages as plain functions over small dicts and URIs.

Each DAG task calls exactly one of these; the benchmark calls them in one process.
Inputs are the validated params (a dict) and the URIs earlier stages returned;
outputs are small JSON-able dicts (never payloads), fit for XCom.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path

from .artifacts import ArtifactStore, path_to_uri, uri_to_path
from .assets.corpus import builtin_corpus, read_texts
from .assets.domains import heldout_for, user_domains
from .assets.tasks import ALL_TASKS
from .calibration.dataset import build_calibration_set, load_samples
from .errors import PipelineError
from .prep.baseline import BASELINE_FILE, compute_baseline, load_reference
from .prep.checkpoint import verify_checkpoint
from .prep.sources import resolve_model_uri
from .quantization.recipes import check_group_size
from .quantization.run import PROVENANCE, quantize
from .settings import PipelineParams
from .store import Store
from .validation.blocks import UNIT as BLOCK_UNIT, block_errors
from .validation.checks import (artifact_checks, block_check, overall_verdict, run_checks, task_allowance,
                                uninformative)
from .validation.companions import companion_differences
from .validation.slices import Positions, positions_from, token_class_table
from .validation.engine.placement import resolve_placement
from .validation.metrics import as_domains, heldout_segments, load_model, measure_loaded
from .validation.sharding import placed
from .validation.sensitivity import most_sensitive, sensitivity
from .validation.suite import TaskSuite, build_suite
from .validation.untouched import compare_untouched
from .validation import user_tasks
from .validation.report import REPORT_HTML, REPORT_JSON, build_report, render_html

log = logging.getLogger(__name__)

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
           # progress bars on stderr read as ERROR lines in Airflow task logs; stages log progress instead
           "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
    os.environ.setdefault(_k, "1")


def safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:120]


def _ctx(params: dict, store: Store) -> tuple[PipelineParams, ArtifactStore]:
    """The validated params and the store's work area (where this stage writes)."""
    return PipelineParams.model_validate(params), store.work


def validate_params(flat: dict, *, store: Store) -> dict:
    """Trigger-form params -> the validated, nested settings dict every later stage reads."""
    try:
        p = PipelineParams.from_flat(flat)
    except ValueError as e:
        raise PipelineError(f"invalid params: {e}") from e
    if p.evaluation.eval_domains_path:  # a broken file is refused before any heavy work
        user_domains(Path(p.evaluation.eval_domains_path))
    mine: list[str] = []
    if p.evaluation.user_tasks_uri:  # so is a broken task folder, naming the file
        found = user_tasks.check(_user_tasks(p.evaluation.user_tasks_uri, store))
        mine = sorted(k for k in found if k != user_tasks.ANSWERS_FILE)
        log.info("your tasks: %s", "; ".join(f"{k} ({v['output_type']}, {v['items']} items, {v['metric']})"
                                             for k, v in found.items()))
    unknown = sorted(set(p.evaluation.tasks) - set(ALL_TASKS) - set(mine))
    if unknown:
        raise PipelineError(f"invalid params: unknown task sets {unknown}; built-in: {list(ALL_TASKS)}"
                            + (f"; yours: {mine}" if mine else "; add user_tasks_uri for your own"))
    log.info("params: %s", p.model_dump_json())
    return p.model_dump(mode="json")


def _user_tasks(uri: str, store: Store) -> Path:
    """The user's task folder staged on this worker (fetched from the remote store when remote)."""
    return user_tasks.stage(uri, store.cache_dir, store.fetch_folder)


def _suite(s, store: Store, device: str) -> TaskSuite | None:
    """The task sets this worker measures for evaluation settings ``s`` (same for baseline and candidate)."""
    mine = _user_tasks(s.user_tasks_uri, store) if s.user_tasks_uri else None
    if s.task_limit == 0 and mine is None:
        return None
    repo = Path(__file__).resolve().parents[2]
    hidden = tuple(dict.fromkeys(x for x in (store.artifact_root, store.cache_dir, repo) if x.exists()))
    return build_suite(s, device, store.cache_dir, mine, hidden)


def prep_checkpoint(params: dict, *, store: Store, hf_token: str | None = None) -> dict:
    """Resolve and verify the checkpoint, measure (or reuse) its baseline. ``hf_token``: for an
    ``hf://`` model on a worker that reaches the hub (from an Airflow connection, never XCom)."""
    p, work = _ctx(params, store)
    folder = resolve_model_uri(p.model_uri, store.cache_dir, store, hf_token)
    info = verify_checkpoint(folder)
    check_group_size(p.quant, info.hidden_size, info.intermediate_size)
    heldout, heldout_hash = heldout_for(store.cache_dir, p.evaluation.domains, p.evaluation.eval_domains_path)
    t0 = time.perf_counter()
    placement = resolve_placement()
    tasks = _suite(p.evaluation, store, placement.device)
    uri, metrics, reused = compute_baseline(work, folder, info.checkpoint_hash, heldout, heldout_hash,
                                            p.evaluation, tasks, placement)
    ppl = metrics["perplexity"]["perplexity"]
    log.info("baseline perplexity %.3f (%s, %.1f s)", ppl, "cached" if reused else "computed",
             time.perf_counter() - t0)
    if not reused:
        log.info("baseline measured: %s", _measured(metrics))
    ckpt_uri = store.upload(folder, f"checkpoints/{info.checkpoint_hash[:24]}") if store.is_remote \
        else path_to_uri(folder)
    uri = store.publish(uri_to_path(uri))
    return {"checkpoint_uri": ckpt_uri, "checkpoint_hash": info.checkpoint_hash,
            "num_parameters": info.num_parameters, "size_bytes": info.size_bytes,
            "architecture": info.architecture, "vocab_size": info.vocab_size,
            "baseline_uri": uri, "baseline_perplexity": ppl, "baseline_reused": reused}


def build_calibration(params: dict, prep: dict, *, store: Store) -> dict:
    p, work = _ctx(params, store)
    if not p.quant.needs_calibration:
        log.info("method %s needs no calibration data; skipping", p.quant.method)
        return {"calibration_uri": None, "calibration_key": None, "num_samples": 0}
    texts = Path(p.calibration.dataset_path) if p.calibration.dataset_path else \
        builtin_corpus(store.cache_dir) / "calibration.jsonl"
    res = build_calibration_set(work, texts, store.local_path(prep["checkpoint_uri"]), prep["vocab_size"],
                                p.calibration)
    return {"calibration_uri": store.publish(uri_to_path(res.uri)), "calibration_key": res.key, "num_samples": res.num_samples,
            "total_tokens": res.total_tokens, "reused": res.reused}


def run_quantization(params: dict, prep: dict, calib: dict, *, store: Store) -> dict:
    p, work = _ctx(params, store)
    samples = load_samples(store.local_path(calib["calibration_uri"])) if calib.get("calibration_uri") else None
    res = quantize(work, store.local_path(prep["checkpoint_uri"]), prep["checkpoint_hash"], p.quant, samples,
                   calib.get("calibration_key"), p.calibration.max_seq_length)
    if samples and not res.reused:
        log.info("quantized with %d calibration samples in %.1f s (%.3g samples/s)", len(samples), res.seconds,
                 len(samples) / res.seconds if res.seconds else 0.0)
    return {"quantized_uri": store.publish(uri_to_path(res.uri)), "scheme": res.scheme, "method": p.quant.method,
            "seconds": res.seconds, "size_bytes": res.size_bytes, "reused": res.reused}


def _positions(baseline: dict, quantized: dict, reference: dict) -> tuple[Positions | None, str]:
    """Per-position arrays of both models, or None with what is missing (never a silent skip)."""
    bh, qh = baseline.get("heldout") or {}, quantized.get("heldout") or {}
    if not bh.get("sha256") or bh.get("sha256") != qh.get("sha256"):
        return None, "the baseline and the candidate were not measured on the same held-out tokens"
    missing = [k for k in ("nll", "top1", "topk_logp") if k not in reference]
    if missing:
        return None, f"the baseline reference lacks {missing}"
    pp = quantized["per_position"]
    if "kl" not in pp:
        return None, "no KL against the baseline reference"
    windows = quantized["windows"]
    domains = list(dict.fromkeys(d for _, _, d in windows))
    base = {"nll": reference["nll"].numpy(), "top1": reference["top1"].numpy(),
            "top1_logp": reference["topk_logp"][:, 0].float().numpy()}
    cand = {k: v.numpy() for k, v in pp.items()}
    sizes = {len(v) for v in (*base.values(), *cand.values())}
    if len(sizes) != 1:
        return None, f"per-position arrays differ in length: {sorted(sizes)}"
    return positions_from(quantized["heldout_ids"], windows, domains, base, cand), ""


def exact_checks(baseline_dir: Path, candidate_dir: Path, model, tokenizer) -> list:
    """The candidate's full-precision tensors and served files against the baseline's."""
    t0 = time.perf_counter()
    untouched = compare_untouched(baseline_dir, candidate_dir, model.state_dict(), tokenizer)
    files = companion_differences(baseline_dir, candidate_dir, tokenizer)
    checks = artifact_checks(untouched, files)
    log.info("weights and files compared with the baseline in %.1f s: %s", time.perf_counter() - t0,
             "; ".join(f"{c.name} {c.verdict}" for c in checks))
    return checks


BLOCK_WINDOWS, BLOCK_TOKENS = 3, 256


def check_blocks(baseline_dir: Path, model, tokenizer, heldout, s, tol):
    """``blocks:worst`` on a few held-out windows, spread over the domains."""
    t0 = time.perf_counter()
    ids, windows, _ = heldout_segments(tokenizer, as_domains(heldout), s.ppl_max_tokens, s.ppl_window)
    windows = [w for w in windows if w[1] >= 2 * BLOCK_UNIT]
    if not windows:
        return block_check(None, tol.max_block_error, missing="no held-out window long enough")
    picked = [windows[round(k * (len(windows) - 1) / max(BLOCK_WINDOWS - 1, 1))] for k in range(BLOCK_WINDOWS)]
    n = min(BLOCK_TOKENS, *(w[1] for w in picked))
    batch = [ids[start:start + n] for start, _, _ in dict.fromkeys(picked)]
    try:
        errs = block_errors(model, baseline_dir, batch)
    except (ValueError, TypeError, RuntimeError) as e:  # a block the code cannot rebuild: not measured, never a pass
        log.warning("blocks not compared: %s", e)
        return block_check(None, tol.max_block_error, missing=f"the blocks could not be compared: {e}")
    check = block_check(errs, tol.max_block_error)
    log.info("blocks compared with the baseline's in %.1f s (%d positions): %s %s", time.perf_counter() - t0,
             errs.positions, check.verdict, check.note)
    return check


def _token_classes(tokenizer, cache_dir: Path) -> dict:
    """Token classes of this tokenizer; ``rare`` by counts in a sample of the calibration corpus."""
    texts = read_texts(builtin_corpus(cache_dir) / "calibration.jsonl")[:RARE_REFERENCE_PASSAGES]
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return token_class_table(tokenizer, ids)


RARE_REFERENCE_PASSAGES = 800


def run_validation(params: dict, prep: dict, quant: dict, run_id: str, label: str = "validation",
                   extra: dict | None = None, *, store: Store) -> dict:
    """Measure the quantized model exactly as the baseline was measured, check every slice
    with its confidence, rank layer sensitivity, and write one report (JSON + HTML) under
    runs/<run_id>/<label>-*."""
    p, work = _ctx(params, store)
    placement = resolve_placement()
    heldout, heldout_hash = heldout_for(store.cache_dir, p.evaluation.domains, p.evaluation.eval_domains_path)
    qpath = store.local_path(quant["quantized_uri"])
    s, t0, rounds = p.evaluation, time.perf_counter(), []
    qplace = placed(qpath, placement)
    load_s = time.perf_counter()
    qmodel, tok = load_model(qpath, qplace)
    load_s = round(time.perf_counter() - load_s, 2)
    # exact checks first: what the recipe must leave as it was (full-precision rows, served files)
    bpath = store.local_path(prep["checkpoint_uri"])
    fixed = exact_checks(bpath, qpath, qmodel, tok) + [check_blocks(bpath, qmodel, tok, heldout, s, p.tolerances)]
    classes = _token_classes(tok, store.cache_dir)
    while True:
        tasks = _suite(s, store, placement.device)
        baseline, bfolder = _matching_baseline(store, prep, heldout, heldout_hash, s, tasks, placement)
        reference = load_reference(bfolder)

        def failed_before_tasks(partial: dict, baseline=baseline, reference=reference) -> str:
            """With fail_fast, why the task sets need not be measured ('' when they must be)."""
            if not p.tolerances.fail_fast:
                return ""
            ppos, pmissing = _positions(baseline, partial, reference)
            early = fixed + run_checks(baseline, partial, p.tolerances, ppos, classes, [], pmissing)[0]
            failed = [c.name for c in early if c.verdict == "FAIL"]
            return (f"not measured: the candidate had already failed {', '.join(failed[:6])}"
                    f"{' and more' if len(failed) > 6 else ''} (fail_fast)") if failed else ""

        quantized = measure_loaded(qmodel, tok, heldout, s, informative(tasks, baseline.get("accuracy"), p.tolerances),
                                   reference, qplace, before_tasks=failed_before_tasks)
        quantized["load_seconds"] = load_s
        quantized.pop("dist")
        log.info("round %d measured: %s", len(rounds) + 1, _measured(quantized))
        pos, missing = _positions(baseline, quantized, reference)
        wanted = list(tasks.names) if tasks is not None else []
        checks, side = run_checks(baseline, quantized, p.tolerances, pos, classes, wanted, missing)
        checks = fixed + checks
        side["excluded"].extend({"name": f"task:{n}", "reason": why, "baseline": None, "chance": None, "n": 0}
                                for n, why in (tasks.unavailable if tasks else {}).items())
        verdict = overall_verdict(checks)
        rounds.append({"ppl_max_tokens": s.ppl_max_tokens, "task_limit": s.task_limit, "verdict": verdict,
                       "inconclusive": [c.name for c in checks if c.verdict == "INCONCLUSIVE"],
                       "seconds": round(time.perf_counter() - t0, 1)})
        more = escalate(s, checks, baseline.get("accuracy"), time.perf_counter() - t0, len(rounds))
        if more is None:
            break
        log.info("round %d %s (%s inconclusive): measuring more, %s", len(rounds), verdict,
                 ", ".join(rounds[-1]["inconclusive"]), {k: v for k, v in more.model_dump().items()
                                                         if v != s.model_dump()[k]})
        s = more
    ids = quantized.pop("heldout_ids")
    for k in ("per_position", "windows"):
        quantized.pop(k)
    sens = None
    if s.sensitivity_layers:
        bmodel, _ = load_model(bpath, placement)
        sens = sensitivity(bmodel, qmodel, ids, s.ppl_window, s.sensitivity_layers)
        del bmodel
    del qmodel
    for c in checks:
        log.info("check %-28s %s estimate %s interval [%s, %s] limit %s (n=%d)%s", c.name, c.verdict,
                 _fmt(c.estimate), _fmt(c.low), _fmt(c.high), c.threshold, c.n, f": {c.note}" if c.note else "")
    prov = json.loads((qpath / PROVENANCE).read_text())
    report = build_report(
        run_id=run_id,
        model={"uri": prep["checkpoint_uri"], "path": str(bpath),
               "checkpoint_hash": prep["checkpoint_hash"], "num_parameters": prep["num_parameters"],
               "size_bytes": prep["size_bytes"]},
        quantization={**quant, "provenance": prov}, baseline=baseline, quantized=quantized,
        checks=checks, consistency=side["consistency"], tolerances=p.tolerances.model_dump())
    report["answers"] = side["answers"]
    report["measurement_rounds"] = rounds
    report["excluded_checks"] = side["excluded"]
    report["heldout"] = {k: v for k, v in quantized["heldout"].items() if k != "windows"}
    report["heldout"]["domains"] = {d: sum(n for n, dd in quantized["heldout"]["windows"] if dd == d)
                                    for d in dict.fromkeys(dd for _, dd in quantized["heldout"]["windows"])}
    report["sensitivity"] = sens
    report["accuracy"] = {"baseline": _no_items(baseline.get("accuracy")),
                          "quantized": _no_items(quantized.get("accuracy"))}
    report["kl"] = quantized["perplexity"].get("kl")
    report["suite"] = suite_summary(tasks, placement.kind)
    if extra:
        report.update(extra)
    rid = safe_run_id(run_id)
    name = f"{label}-{quant['method']}-{time.strftime('%Y%m%dT%H%M%S')}"
    with work.writing("runs", rid, name, meta={"passed": report["passed"], "verdict": report["verdict"]}) as out:
        (out / REPORT_JSON).write_text(json.dumps(report, indent=1))
        (out / REPORT_HTML).write_text(render_html(report))
    folder_uri = store.publish(work.path("runs", rid, name))
    log.info("%s %s; report: %s/%s", label, report["verdict"] + ("" if report["passed"] else
             " (failed: " + ", ".join(report["failed_checks"]) + "; inconclusive: " +
             ", ".join(report["inconclusive_checks"]) + ")"), folder_uri, REPORT_HTML)
    by_name = {c.name: c for c in checks}
    return {"report_folder_uri": folder_uri, "report_uri": f"{folder_uri}/{REPORT_JSON}",
            "report_html_uri": f"{folder_uri}/{REPORT_HTML}",
            "passed": report["passed"], "verdict": report["verdict"], "failed_checks": report["failed_checks"],
            "inconclusive_checks": report["inconclusive_checks"],
            "perplexity_baseline": baseline["perplexity"]["perplexity"],
            "perplexity_quantized": quantized["perplexity"]["perplexity"],
            "token_agreement": side["consistency"]["token_agreement"],
            "exact_match_rate": side["consistency"]["exact_match_rate"],
            "top1_agreement": by_name["top1_agreement"].estimate,
            "mean_kl": by_name["kl_divergence"].estimate,
            "next_token_accuracy_baseline": baseline["perplexity"]["next_token_accuracy"],
            "next_token_accuracy_quantized": quantized["perplexity"]["next_token_accuracy"],
            "sensitive_layers": most_sensitive(sens, 16) if sens else [],
            "quant": quant, "settings": params, **({"attempt": extra["remediation"]["attempt"]} if extra else {})}


def informative(tasks: TaskSuite | None, b_acc: dict | None, tol) -> TaskSuite | None:
    """The suite the candidate is measured on: without the sets its baseline cannot show
    damage on (they are reported as excluded with the reason whatever the candidate scores)."""
    if tasks is None or not tasks.names:
        return tasks
    done = (b_acc or {}).get("tasks") or {}
    keep = tuple(n for n in tasks.names
                 if n not in done or not uninformative(done[n], task_allowance(tol, n)))
    if keep != tasks.names:
        log.info("task sets the baseline cannot show damage on, not measured for the candidate: %s",
                 ", ".join(n for n in tasks.names if n not in keep))
    return dataclasses.replace(tasks, names=keep)


def _matching_baseline(store: Store, prep: dict, heldout: dict, heldout_hash: str, s, tasks,
                       placement) -> tuple[dict, Path]:
    """The baseline measured exactly as the candidate will be: prep's when it matches (device
    kind, held-out text, evaluation settings), else the one cached or measured for these."""
    bfolder = store.local_path(prep["baseline_uri"])
    baseline = json.loads((bfolder / BASELINE_FILE).read_text())
    same = (baseline.get("engine", "cpu-float32") == placement.kind and baseline.get("settings") == s.model_dump(mode="json")
            and (baseline.get("heldout") or {}).get("content_sha256") == heldout_hash)
    if same:
        return baseline, bfolder
    log.info("baseline from prep was measured otherwise (%s); using the baseline for %s on %s",
             baseline.get("engine", "cpu-float32"), {"ppl_max_tokens": s.ppl_max_tokens, "task_limit": s.task_limit},
             placement.kind)
    uri, baseline, _ = compute_baseline(store.work, store.local_path(prep["checkpoint_uri"]), prep["checkpoint_hash"], heldout,
                                        heldout_hash, s, tasks, placement)
    return baseline, uri_to_path(uri)


def suite_summary(tasks: TaskSuite | None, engine: str) -> dict:
    """What the report says about the task suite: what was measured on this worker, what its
    default leaves out (the GPU-only sets on a CPU worker) and what could not be measured."""
    from .assets.tasks import GPU_SUITE

    measured = list(tasks.names) if tasks else []
    return {"engine": engine, "measured": measured, "items_per_set": tasks.limit if tasks else 0,
            "not_measured": {n: "not in this worker's default suite (CPU workers measure the sets a CPU scores "
                                "in minutes); name it in tasks to measure it here"
                             for n in GPU_SUITE if n not in measured and not (tasks and n in tasks.unavailable)}
            | (dict(tasks.unavailable) if tasks else {})}


MAX_ROUNDS = 3  # the first measurement and at most two larger ones


def escalate(s, checks: list, b_acc: dict | None, elapsed: float, rounds: int):
    """Larger evaluation settings when the verdict is INCONCLUSIVE and more data can decide it:
    twice the held-out tokens per domain when a divergence check is undecided, twice the task
    items when a task check is (up to the sets' sizes); None when there is nothing to gain, no
    rounds are left, or the next round (about twice this one) would overrun ``time_budget_s``."""
    if overall_verdict(checks) != "INCONCLUSIVE" or rounds >= MAX_ROUNDS:
        return None
    if elapsed / rounds * 2 * 1.2 > s.time_budget_s - elapsed:
        log.info("INCONCLUSIVE after %.0f s; a larger measurement would overrun time_budget_s=%d", elapsed,
                 s.time_budget_s)
        return None
    undecided = {c.group for c in checks if c.verdict == "INCONCLUSIVE"}
    update = {}
    if undecided & {"overall", "domain", "token class", "context"} and s.ppl_max_tokens * 2 <= 1_000_000:
        update["ppl_max_tokens"] = s.ppl_max_tokens * 2
    sizes = [t["n"] for t in ((b_acc or {}).get("tasks") or {}).values()]
    if "tasks" in undecided and s.task_limit and sizes and max(sizes) >= s.task_limit:
        update["task_limit"] = min(s.task_limit * 2, 5000)
    return s.model_copy(update=update) if update else None


def _measured(m: dict) -> str:
    """One line of what a measurement covered, with its rates: held-out tokens, prompts, task items."""
    secs = m.get("measure_seconds") or 0.0
    tokens = (m.get("heldout") or {}).get("tokens") or 0
    items = sum(t.get("n", 0) for t in ((m.get("accuracy") or {}).get("tasks") or {}).values())
    parts = [f"{tokens} held-out tokens", f"{len(m.get('generations') or [])} greedy prompts",
             f"{len(m.get('answers') or [])} answer prompts"] + ([f"{items} task items"] if items else [])
    rate = f" ({tokens / secs:.0f} tokens/s overall)" if secs else ""
    return f"{', '.join(parts)} in {secs:.1f} s{rate}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _no_items(acc: dict | None) -> dict | None:
    if not acc:
        return None
    return {**acc, "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "per_item"}
                             for k, v in acc["tasks"].items()}}


def latest_result(results: list[dict | None]) -> dict:
    """The last validation that ran (validate, then each remediation attempt in order)."""
    done = [r for r in results if r]
    if not done:
        raise PipelineError("no validation result to act on")
    return done[-1]


def safer_settings(params: dict, previous: dict, attempt: int, n_layers: int) -> tuple[dict, dict]:
    """A safer recipe than ``previous`` used: keep the most sensitive layers and the first and
    last decoder blocks unquantized, halve the group size (gptq/awq), double the calibration
    samples. Returns (new params, a description of the changes)."""
    p = PipelineParams.model_validate(previous["settings"])
    keep = p.remediation.keep_sensitive_layers * attempt
    sensitive = [x for x in previous.get("sensitive_layers", [])[:keep]]
    edge = [r"re:model\.layers\.0\..*", rf"re:model\.layers\.{n_layers - 1}\..*"]
    ignore = list(dict.fromkeys([*p.quant.ignore, *edge, *sensitive]))
    q = p.quant.model_dump()
    q["ignore"] = tuple(ignore)
    changes = {"kept_unquantized": ignore}
    if p.quant.uses_groups:
        smaller = [g for g in (32, 64, 96, 192) if g < p.quant.group_size and
                   p.quant.group_size % g == 0] or [p.quant.group_size]
        q["group_size"] = max(smaller) if smaller[0] != p.quant.group_size else p.quant.group_size
        changes["group_size"] = [p.quant.group_size, q["group_size"]]
    c = p.calibration.model_dump()
    if p.quant.needs_calibration:
        c["num_samples"] = min(p.calibration.num_samples * 2, 4096)
        changes["calibration_samples"] = [p.calibration.num_samples, c["num_samples"]]
    new = p.model_copy(update={"quant": type(p.quant)(**q), "calibration": type(p.calibration)(**c)})
    return new.model_dump(mode="json"), changes


def remediate(params: dict, prep: dict, previous: list[dict | None], attempt: int, run_id: str, *,
              store: Store) -> dict | None:
    """One remediation attempt, or None when none is needed (last result passed, remediation
    off, or attempts exhausted). The caller turns None into a visible skip."""
    p = PipelineParams.model_validate(params)
    last = latest_result(previous)
    if last["passed"]:
        log.info("remediation attempt %d not needed: the last validation passed", attempt)
        return None
    if not p.remediation.enabled or attempt > p.remediation.max_attempts:
        log.info("remediation attempt %d not run (enabled=%s, max_attempts=%d)", attempt,
                 p.remediation.enabled, p.remediation.max_attempts)
        return None
    n_layers = json.loads((store.local_path(prep["checkpoint_uri"]) / "config.json").read_text())["num_hidden_layers"]
    new_params, changes = safer_settings(params, last, attempt, n_layers)
    log.info("remediation attempt %d after %s failed: %s", attempt, ", ".join(last["failed_checks"]), changes)
    calib = build_calibration(new_params, prep, store=store)
    quant = run_quantization(new_params, prep, calib, store=store)
    first_size = latest_result(previous[:1] or previous)["quant"]["size_bytes"]
    extra = {"remediation": {"attempt": attempt, "after_failed_checks": last["failed_checks"], "changes": changes,
                             "size_bytes": quant["size_bytes"], "size_vs_first_attempt": quant["size_bytes"] / first_size}}
    return run_validation(new_params, prep, quant, run_id, label=f"remediation{attempt}", extra=extra, store=store)


def gate(validation: dict) -> bool:
    if validation["passed"]:
        log.info("gate open: all checks passed")
    else:
        log.warning("gate closed: %s failed; see %s", ", ".join(validation["failed_checks"]),
                    validation["report_html_uri"])
    return bool(validation["passed"])


def publish_approved(params: dict, validation: dict, run_id: str, review: dict | None = None, *,
                     store: Store) -> dict:
    """Record the approved model's URI: a per-run record and a per-model pointer (atomic replace).

    ``review`` is the person's answer (``validation.review.review_record``) when the verdict went to
    a review; it is part of the record, and a needed review must have approved."""
    from .validation.review import gate_decision

    p, work = _ctx(params, store)
    if not gate_decision(validation, review):
        raise PipelineError(f"refusing to publish a model whose validation verdict is {validation.get('verdict')}"
                            + (" and whose review rejected it" if review else ""))
    quant = validation["quant"]
    record = {"run_id": run_id, "run_name": p.run_name, "model_uri": quant["quantized_uri"],
              "scheme": quant["scheme"], "method": quant["method"], "report_uri": validation["report_uri"],
              "remediation_attempt": validation.get("attempt", 0), "verdict": validation.get("verdict"),
              "review": review,
              "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rid = safe_run_id(run_id)
    with work.writing("runs", rid, "approved") as out:
        (out / "approved.json").write_text(json.dumps(record, indent=1))
    record_uri = store.publish(work.path("runs", rid, "approved"))
    pointer = store.write_pointer(f"approved/{p.run_name}.json", record)
    log.info("approved model published: %s (pointer %s)", quant["quantized_uri"], pointer)
    return {"approved_uri": quant["quantized_uri"], "record_uri": record_uri, "pointer_uri": pointer}


def record_review(params: dict, result: dict, record: dict, run_id: str, *, store: Store) -> str:
    """Keep a person's review of a release next to the run's reports:
    runs/<run_id>/review/review.json (written once; a later, different review of the same run,
    after its review task was cleared and answered again, goes to review-2, review-3, ...).
    Returns the URI of the review.json."""
    p, work = _ctx(params, store)
    rid = safe_run_id(run_id)
    body = {"run_id": run_id, "run_name": p.run_name, **record}
    for n in range(1, 100):
        name = "review" if n == 1 else f"review-{n}"
        existing = work.find("runs", rid, name)
        if existing is not None:
            if json.loads((existing / "review.json").read_text()) == body:  # the same answer, recorded again
                return store.publish(existing) + "/review.json"
            continue
        with work.writing("runs", rid, name, meta={"approved": bool(record.get("approved")),
                                                   "verdict": record.get("verdict")}) as out:
            (out / "review.json").write_text(json.dumps(body, indent=1))
        uri = store.publish(work.path("runs", rid, name)) + "/review.json"
        log.info("review recorded: %s by %s (%s)", "approved" if record.get("approved") else "rejected",
                 (record.get("responded_by") or {}).get("name", "nobody (timeout default)"), uri)
        return uri
    raise PipelineError(f"too many reviews recorded for run {run_id}")
