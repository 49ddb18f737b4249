"""The stages as plain functions over small dicts and URIs.

Each DAG task calls exactly one of these; the benchmark calls them in one process.
Inputs are the validated params (a dict) and the URIs earlier stages returned;
outputs are small JSON-able dicts (never payloads), fit for XCom.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from .artifacts import ArtifactStore, path_to_uri, uri_to_path
from .assets.corpus import builtin_corpus, read_texts
from .calibration.dataset import build_calibration_set, load_samples
from .errors import PipelineError
from .prep.baseline import BASELINE_FILE, compute_baseline
from .prep.checkpoint import resolve_model_uri, verify_checkpoint
from .quantization.recipes import check_group_size
from .quantization.run import PROVENANCE, quantize
from .settings import Environment, PipelineParams
from .validation.checks import run_checks
from .validation.metrics import measure
from .validation.report import REPORT_HTML, REPORT_JSON, build_report, render_html

log = logging.getLogger(__name__)

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")


def safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:120]


def _ctx(params: dict) -> tuple[PipelineParams, Environment, ArtifactStore]:
    p = PipelineParams.model_validate(params)
    env = Environment.from_env()
    return p, env, ArtifactStore(env.artifact_root)


def validate_params(flat: dict) -> dict:
    """Trigger-form params -> the validated, nested settings dict every later stage reads."""
    try:
        p = PipelineParams.from_flat(flat)
    except ValueError as e:
        raise PipelineError(f"invalid params: {e}") from e
    log.info("params: %s", p.model_dump_json())
    return p.model_dump(mode="json")


def prep_checkpoint(params: dict) -> dict:
    p, env, store = _ctx(params)
    folder = resolve_model_uri(p.model_uri, env.cache_dir)
    info = verify_checkpoint(folder)
    check_group_size(p.quant, info.hidden_size, info.intermediate_size)
    corpus = builtin_corpus(env.cache_dir)
    t0 = time.perf_counter()
    uri, metrics, reused = compute_baseline(store, folder, info.checkpoint_hash, corpus / "heldout.jsonl",
                                            p.evaluation)
    ppl = metrics["perplexity"]["perplexity"]
    log.info("baseline perplexity %.3f (%s, %.1f s)", ppl, "cached" if reused else "computed",
             time.perf_counter() - t0)
    return {"checkpoint_uri": path_to_uri(folder), "checkpoint_hash": info.checkpoint_hash,
            "num_parameters": info.num_parameters, "size_bytes": info.size_bytes,
            "architecture": info.architecture, "vocab_size": info.vocab_size,
            "baseline_uri": uri, "baseline_perplexity": ppl, "baseline_reused": reused}


def build_calibration(params: dict, prep: dict) -> dict:
    p, env, store = _ctx(params)
    if not p.quant.needs_calibration:
        log.info("method %s needs no calibration data; skipping", p.quant.method)
        return {"calibration_uri": None, "calibration_key": None, "num_samples": 0}
    texts = Path(p.calibration.dataset_path) if p.calibration.dataset_path else \
        builtin_corpus(env.cache_dir) / "calibration.jsonl"
    res = build_calibration_set(store, texts, uri_to_path(prep["checkpoint_uri"]), prep["vocab_size"],
                                p.calibration)
    return {"calibration_uri": res.uri, "calibration_key": res.key, "num_samples": res.num_samples,
            "total_tokens": res.total_tokens, "reused": res.reused}


def run_quantization(params: dict, prep: dict, calib: dict) -> dict:
    p, env, store = _ctx(params)
    samples = load_samples(uri_to_path(calib["calibration_uri"])) if calib.get("calibration_uri") else None
    res = quantize(store, uri_to_path(prep["checkpoint_uri"]), prep["checkpoint_hash"], p.quant, samples,
                   calib.get("calibration_key"), p.calibration.max_seq_length)
    return {"quantized_uri": res.uri, "scheme": res.scheme, "method": p.quant.method,
            "seconds": res.seconds, "size_bytes": res.size_bytes, "reused": res.reused}


def run_validation(params: dict, prep: dict, quant: dict, run_id: str) -> dict:
    p, env, store = _ctx(params)
    baseline = json.loads((uri_to_path(prep["baseline_uri"]) / BASELINE_FILE).read_text())
    qpath = uri_to_path(quant["quantized_uri"])
    heldout = read_texts(builtin_corpus(env.cache_dir) / "heldout.jsonl")
    quantized = measure(qpath, heldout, p.evaluation)
    checks, cons = run_checks(baseline, quantized, p.tolerances)
    for c in checks:
        log.info("check %-24s baseline %.4g quantized %.4g delta %+.4g threshold %s -> %s", c.name,
                 c.baseline, c.quantized, c.delta, c.threshold, "pass" if c.passed else "FAIL")
    prov = json.loads((qpath / PROVENANCE).read_text())
    report = build_report(
        run_id=run_id,
        model={"uri": prep["checkpoint_uri"], "path": str(uri_to_path(prep["checkpoint_uri"])),
               "checkpoint_hash": prep["checkpoint_hash"], "num_parameters": prep["num_parameters"],
               "size_bytes": prep["size_bytes"]},
        quantization={**quant, "provenance": prov}, baseline=baseline, quantized=quantized,
        checks=checks, consistency=cons, tolerances=p.tolerances.model_dump())
    rid = safe_run_id(run_id)
    name = f"validation-{quant['method']}-{time.strftime('%Y%m%dT%H%M%S')}"
    with store.writing("runs", rid, name, meta={"passed": report["passed"]}) as out:
        (out / REPORT_JSON).write_text(json.dumps(report, indent=1))
        (out / REPORT_HTML).write_text(render_html(report))
    folder = store.path("runs", rid, name)
    log.info("validation %s; report: %s", "PASSED" if report["passed"] else
             "FAILED (" + ", ".join(report["failed_checks"]) + ")", folder / REPORT_HTML)
    return {"report_uri": path_to_uri(folder / REPORT_JSON), "report_html_uri": path_to_uri(folder / REPORT_HTML),
            "passed": report["passed"], "failed_checks": report["failed_checks"],
            "perplexity_baseline": baseline["perplexity"]["perplexity"],
            "perplexity_quantized": quantized["perplexity"]["perplexity"],
            "token_agreement": cons["token_agreement"], "exact_match_rate": cons["exact_match_rate"],
            "top1_agreement": cons["top1_agreement"],
            "next_token_accuracy_baseline": baseline["perplexity"]["next_token_accuracy"],
            "next_token_accuracy_quantized": quantized["perplexity"]["next_token_accuracy"]}


def gate(validation: dict) -> bool:
    if validation["passed"]:
        log.info("gate open: all checks passed")
    else:
        log.warning("gate closed: %s failed; see %s", ", ".join(validation["failed_checks"]),
                    validation["report_html_uri"])
    return bool(validation["passed"])


def publish_approved(params: dict, quant: dict, validation: dict, run_id: str) -> dict:
    """Record the approved model's URI: a per-run record and a per-model pointer (atomic replace)."""
    p, env, store = _ctx(params)
    if not validation["passed"]:
        raise PipelineError("refusing to publish a model whose validation failed")
    record = {"run_id": run_id, "run_name": p.run_name, "model_uri": quant["quantized_uri"],
              "scheme": quant["scheme"], "method": quant["method"], "report_uri": validation["report_uri"],
              "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rid = safe_run_id(run_id)
    with store.writing("runs", rid, "approved") as out:
        (out / "approved.json").write_text(json.dumps(record, indent=1))
    pointer = store.path("approved", f"{p.run_name}.json")
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, pointer)
    log.info("approved model published: %s (pointer %s)", quant["quantized_uri"], pointer)
    return {"approved_uri": quant["quantized_uri"], "record_uri": store.uri("runs", rid, "approved"),
            "pointer_uri": path_to_uri(pointer)}
