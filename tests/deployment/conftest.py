"""Fixtures for stage 5: fake and real vLLM servers, checkpoints and validation reports."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVING_PY = REPO / ".venv-serving" / "bin" / "python"
FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")
DATA = Path(__file__).with_name("data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_block(n: int = 20) -> tuple[int, int]:
    for _ in range(50):
        lo = random.randrange(20000, 40000)
        ok = True
        for p in range(lo, lo + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return lo, lo + n - 1
    raise RuntimeError("no free port block")


def make_settings(state_dir: Path, **kw):
    from quantpipe.deployment.settings import DeploySettings

    lo, hi = port_block()
    endpoint = free_port()
    while lo <= endpoint <= hi:
        endpoint = free_port()
    return DeploySettings.load({"state_dir": state_dir, "endpoint_port": endpoint, "backend_ports": (lo, hi), **kw},
                               environ={})


def write_validation(store, run: str, model_dir: Path, generations: list[dict], passed: bool = True) -> dict:
    """A validation result + report.json as stage 4 writes them (only the fields stage 5 reads)."""
    from quantpipe.artifacts import path_to_uri

    report = {"run_id": run, "passed": passed, "failed_checks": [] if passed else ["perplexity_increase"],
              "quantization": {"quantized_uri": path_to_uri(model_dir)},
              "generations": {"baseline": generations, "quantized": generations},
              "eval_settings": {"max_new_tokens": max((len(g["token_ids"]) for g in generations), default=0)}}
    with store.writing("runs", run, "validation") as out:
        (out / "report.json").write_text(json.dumps(report))
    uri = path_to_uri(store.path("runs", run, "validation", "report.json"))
    return {"report_uri": uri, "passed": passed, "failed_checks": report["failed_checks"]}


def params(run_name: str = "smollm2") -> dict:
    from quantpipe.settings import PipelineParams

    return PipelineParams(run_name=run_name, quant={"method": "w8a8", "bits": 8}).model_dump(mode="json")


# ---- fake servers (unit tests) -------------------------------------------------------------------------------

def fake_model(root: Path, name: str, answers: dict[str, list[int]], **spec) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = json.loads((DATA / "config_fp8.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"\0" * 1024)
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "fake.json").write_text(json.dumps({"answers": answers, **spec}))
    return d


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """Artifact store + settings whose vLLM command is the fake server."""
    from quantpipe.artifacts import ArtifactStore

    monkeypatch.setenv("QUANTPIPE_ARTIFACT_ROOT", str(tmp_path / "store"))
    s = make_settings(tmp_path / "state", vllm_cmd=f"{sys.executable} {FAKE_VLLM}", startup_timeout_s=20,
                      stop_timeout_s=5, cpu_runtime_overhead_gib=0.1)
    yield s, ArtifactStore(tmp_path / "store"), tmp_path
    teardown_all(ArtifactStore(tmp_path / "store"), s)


def teardown_all(store, s) -> None:
    """Stop every deployment's server in ``store`` and the endpoint of ``s`` (whatever a test left)."""
    from quantpipe.deployment import switchover
    from quantpipe.deployment.server import stop

    root = store.path("deployments")
    for name in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        switchover.teardown(store, s, name, stop_endpoint=False)
    h = switchover.proxy_handle(s)
    if h:
        stop(h, 5)
    remove_private_scratch(s.state_dir)


def remove_private_scratch(state_dir: Path) -> None:
    """The servers' TMPDIR, when the state folder's path was too long for vLLM's socket paths and it
    went to a short private folder outside it (``server.scratch_dir``; ~150 MB a server): call
    once no server of ``state_dir`` runs."""
    from quantpipe.deployment.server import scratch_dir

    tmp = scratch_dir(state_dir)
    if not tmp.resolve().is_relative_to(Path(state_dir).resolve()):
        shutil.rmtree(tmp, ignore_errors=True)


# ---- real vLLM (slow tests) ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def serving_venv() -> Path:
    if not SERVING_PY.exists():
        pytest.skip(f"serving venv missing ({SERVING_PY}); create it with scripts/setup_serving_env.sh")
    return SERVING_PY


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


CALIBRATION = {"num_samples": 16, "max_seq_length": 128}  # small: the tests check serving, not quality


@pytest.fixture(scope="session")
def calibration_samples(model_dir, corpus_dir) -> list[list[int]]:
    """Stage 2's own sampling of the shipped corpus, kept small."""
    from transformers import AutoTokenizer

    from quantpipe.calibration.dataset import read_jsonl_texts, sample_and_tokenize
    from quantpipe.settings import CalibrationSettings

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sample_and_tokenize(read_jsonl_texts(corpus_dir / "calibration.jsonl"), tok,
                               CalibrationSettings(**CALIBRATION))


def quantized(model_dir: Path, real_root: Path, samples: list[list[int]] | None, **quant) -> Path:
    """The built-in model quantized by stage 3's own function, in this session's store."""
    from quantpipe.artifacts import ArtifactStore, uri_to_path
    from quantpipe.quantization.run import quantize
    from quantpipe.settings import QuantSettings

    t0 = time.perf_counter()
    res = quantize(ArtifactStore(real_root / "qstore"), model_dir, "test-bf16", QuantSettings(**quant), samples,
                   "test-calibration" if samples else None, CALIBRATION["max_seq_length"])
    print(f"quantized {quant} -> {res.scheme} in {time.perf_counter() - t0:.0f} s")
    return uri_to_path(res.uri)


@pytest.fixture(scope="session")
def w8a8_model(model_dir, real_root, calibration_samples) -> Path:
    """W8A8 int8 (SmoothQuant + GPTQ): served through oneDNN, fast on AVX2 and AVX512 CPUs alike."""
    return quantized(model_dir, real_root, calibration_samples, method="w8a8", bits=8)


@pytest.fixture(scope="session")
def gptq4_model(model_dir, real_root, calibration_samples) -> Path:
    """GPTQ 4-bit with a zero point per group (W4A16_ASYM, group 32), the pipeline's 4-bit scheme."""
    return quantized(model_dir, real_root, calibration_samples, method="gptq", bits=4, group_size=32,
                     observer="minmax")  # MSE's scale search costs ~20 min on 2 cores; serving is the same


def hf_generations(model_dir: Path, n: int = 3, max_new_tokens: int = 16) -> list[dict]:
    """What validation records: transformers greedy continuations of the first n validation prompts."""
    from quantpipe.validation.metrics import greedy_generate, load_model, load_prompts

    model, tok = load_model(model_dir)
    return greedy_generate(model, tok, load_prompts(n), max_new_tokens)


@pytest.fixture(scope="session")
def gens_bf16(model_dir) -> list[dict]:
    return hf_generations(model_dir)


@pytest.fixture(scope="session")
def gens_w8a8(w8a8_model) -> list[dict]:
    return hf_generations(w8a8_model)


@pytest.fixture(scope="session")
def gens_gptq4(gptq4_model) -> list[dict]:
    return hf_generations(gptq4_model)
