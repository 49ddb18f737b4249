"""The serving target: detection from fake /proc/cpuinfo text and GPU probes, the override, and the
pre-flight's decision per target (serve, refuse with the reason, warn about a slow fallback)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from quantpipe.deployment import preflight as pf
from quantpipe.deployment import target as tg
from quantpipe.deployment.api import explain_failure
from quantpipe.deployment.health import HealthError
from quantpipe.deployment.server import build_argv, build_env
from quantpipe.deployment.settings import DeploySettings
from quantpipe.errors import PipelineError

from .conftest import DATA

_BASE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
         "syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes "
         "xsave avx f16c rdrand hypervisor lahf_lm abm bmi1 bmi2 erms")
AVX2_FLAGS = _BASE + " avx2"
AVX512_FLAGS = AVX2_FLAGS + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
AMX_FLAGS = AVX512_FLAGS + " avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8"
CPU_CMD = "/x/.venv-serving/bin/python /x/scripts/vllm_cpu.py"


def cpuinfo(flags: str, cpus: int = 2) -> str:
    """/proc/cpuinfo as Linux writes it (tabs before the colon, one block per CPU)."""
    return "\n\n".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                       f"flags\t\t: {flags}\nbugs\t\t: spectre_v1\n" for i in range(cpus)) + "\n"


def cpuinfo_flags(flags: str) -> frozenset[str]:
    return tg.parse_cpu_flags(cpuinfo(flags))


# ---- detection -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, target, amx", [
    (AVX2_FLAGS, "cpu-avx2", False),
    (AVX512_FLAGS, "cpu-avx512", False),
    (AMX_FLAGS, "cpu-avx512", True),
    (_BASE, "cpu-avx2", False),  # neither: the most limited CPU build's rules
])
def test_detects_the_cpu_target_from_cpuinfo(flags, target, amx):
    t = tg.detect_target(cpuinfo=cpuinfo(flags), gpus=0, vllm_cmd=CPU_CMD)
    assert (t.name, t.source, t.amx, t.gpus) == (target, "detected", amx, 0)
    assert t.is_cpu and t.avx512 == (target == "cpu-avx512")
    assert ("and AMX (amx_tile" in t.reason) == amx and "/proc/cpuinfo" in t.reason
    assert set(t.as_dict()["cpu_flags"]) <= set(tg.NOTED_FLAGS)


def test_parse_cpu_flags_reads_the_flags_line_only():
    flags = tg.parse_cpu_flags(cpuinfo(AMX_FLAGS))
    assert {"avx2", "avx512f", "amx_tile"} <= flags and "spectre_v1" not in flags and "GenuineIntel" not in flags
    assert tg.parse_cpu_flags("") == frozenset()


def test_detects_cuda_when_a_gpu_is_visible_and_the_command_is_not_the_cpu_build():
    t = tg.detect_target(cpuinfo=cpuinfo(AVX2_FLAGS), gpus=2, vllm_cmd="vllm")
    assert (t.name, t.gpus, t.is_cpu) == ("cuda", 2, False) and "NVIDIA" in t.reason
    # a GPU node that still runs the CPU wrapper serves on the CPU, and says how to use the GPU
    t = tg.detect_target(cpuinfo=cpuinfo(AMX_FLAGS), gpus=1, vllm_cmd=CPU_CMD)
    assert t.name == "cpu-avx512" and "QUANTPIPE_VLLM_CMD=vllm" in t.reason


def test_count_nvidia_gpus(tmp_path):
    proc, dev = tmp_path / "gpus", tmp_path / "dev"
    dev.mkdir()
    assert tg.count_nvidia_gpus({}, proc, dev) == 0
    for n in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / n).touch()
    assert tg.count_nvidia_gpus({}, proc, dev) == 2
    proc.mkdir()
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:b1:00.0"):
        (proc / bus).mkdir()
    assert tg.count_nvidia_gpus({}, proc, dev) == 3
    assert tg.count_nvidia_gpus({"CUDA_VISIBLE_DEVICES": "1"}, proc, dev) == 1
    assert tg.count_nvidia_gpus({"CUDA_VISIBLE_DEVICES": ""}, proc, dev) == 0
    assert tg.count_nvidia_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, proc, dev) == 0
    assert tg.count_nvidia_gpus({"NVIDIA_VISIBLE_DEVICES": "all"}, proc, dev) == 3


def test_the_override_wins_and_auto_is_the_default():
    s = DeploySettings.load(environ={})
    assert s.target == "auto"
    assert s.serving_target(cpuinfo=cpuinfo(AVX2_FLAGS), gpus=0).name == "cpu-avx2"
    assert s.serving_target(cpuinfo=cpuinfo(AMX_FLAGS), gpus=0).name == "cpu-avx512"
    s = DeploySettings.load(environ={"QUANTPIPE_DEPLOY_TARGET": "cpu-avx2"})
    t = s.serving_target(cpuinfo=cpuinfo(AMX_FLAGS), gpus=0)
    assert (t.name, t.source) == ("cpu-avx2", "configured") and "detection would say cpu-avx512" in t.reason
    with pytest.raises(PipelineError, match="target"):
        DeploySettings.load(environ={"QUANTPIPE_DEPLOY_TARGET": "tpu"})


def test_this_host_is_detected():
    """Whatever this machine is, detection names one of the three targets and agrees with /proc/cpuinfo."""
    t = DeploySettings.load(environ={}).serving_target()
    assert t.name in tg.TARGETS
    flags = tg.parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    if t.is_cpu:
        assert t.name == ("cpu-avx512" if "avx512f" in flags else "cpu-avx2")


def test_launch_options_follow_the_target(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path}, environ={})
    gpu = build_argv(s, tmp_path, "m", 8100, "cuda")
    cpu = build_argv(s, tmp_path, "m", 8100, "cpu-avx512")
    assert "--gpu-memory-utilization" in gpu and "--gpu-memory-utilization" not in cpu
    assert "VLLM_CPU_KVCACHE_SPACE" in build_env(s, None, "cpu-avx2")
    assert "VLLM_CPU_KVCACHE_SPACE" not in build_env(s, None, "cuda")


# ---- the pre-flight's decision per target ------------------------------------------------------------------------

def _ckpt(tmp_path: Path, config: str, name: str | None = None) -> Path:
    d = tmp_path / (name or config.removesuffix(".json"))
    d.mkdir()
    shutil.copy(DATA / config, d / "config.json")
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    return d


def _w4a16_asym(tmp_path: Path) -> Path:
    import json

    d = _ckpt(tmp_path, "config_w4a16.json", "w4a16_asym")
    cfg = json.loads((d / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["weights"]["symmetric"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("flags, gpus, cmd, served", [
    (AVX2_FLAGS, 0, CPU_CMD, False),
    (AVX512_FLAGS, 0, CPU_CMD, True),
    (AMX_FLAGS, 0, CPU_CMD, True),
    (AVX2_FLAGS, 1, "vllm", True),  # cuda
])
def test_4bit_is_served_on_avx512_and_cuda_and_refused_on_avx2(tmp_path, flags, gpus, cmd, served):
    s = DeploySettings.load({"state_dir": tmp_path / "st", "vllm_cmd": cmd}, environ={})
    for ckpt, scheme in ((_ckpt(tmp_path, "config_w4a16.json"), "W4A16"), (_w4a16_asym(tmp_path), "W4A16_ASYM")):
        if served:
            r = pf.run_preflight(ckpt, s, cpu_flags=cpuinfo_flags(flags), gpus=gpus, mem_available=64 * pf.GiB)
            assert r.scheme == scheme and not r.warnings
            assert r.target == ("cuda" if gpus else "cpu-avx512")
        else:
            with pytest.raises(pf.PreflightError) as e:
                pf.run_preflight(ckpt, s, cpu_flags=cpuinfo_flags(flags), gpus=gpus)
            msg = str(e.value)
            assert f"cpu-avx2 vLLM build cannot serve {scheme}" in msg
            assert "cpu_gemm_wna16" in msg and "AVX512" in msg  # the reason
            assert "avx2 without avx512f in /proc/cpuinfo" in msg  # why this target
            assert "method w8a8" in msg  # what to do instead


@pytest.mark.parametrize("flags, gpus, cmd, target, slow", [
    (AVX2_FLAGS, 0, CPU_CMD, "cpu-avx2", True),
    (AMX_FLAGS, 0, CPU_CMD, "cpu-avx512", True),
    (AVX2_FLAGS, 1, "vllm", "cuda", False),
])
def test_fp8_warns_about_the_slow_fallback_on_every_cpu(tmp_path, caplog, flags, gpus, cmd, target, slow):
    s = DeploySettings.load({"state_dir": tmp_path / "st", "vllm_cmd": cmd}, environ={})
    with caplog.at_level(logging.INFO, logger="quantpipe.deployment.preflight"):
        r = pf.run_preflight(_ckpt(tmp_path, "config_fp8.json"), s, cpu_flags=cpuinfo_flags(flags), gpus=gpus,
                             mem_available=64 * pf.GiB)
    assert (r.scheme, r.target) == ("FP8_DYNAMIC", target)
    warned = [rec for rec in caplog.records if rec.levelno == logging.WARNING and "slow fallback" in rec.message]
    assert bool(warned) == slow and bool(r.warnings) == slow
    if slow:
        assert f"FP8_DYNAMIC runs through a slow fallback on {target}" in warned[0].message
        assert "method w8a8" in warned[0].message
    assert any(rec.levelno == logging.INFO and f"serving target {target}" in rec.message for rec in caplog.records)


@pytest.mark.parametrize("flags", [AVX2_FLAGS, AMX_FLAGS])
def test_w8a8_and_bf16_are_served_without_warning_on_every_cpu(tmp_path, flags):
    import json

    s = DeploySettings.load({"state_dir": tmp_path / "st"}, environ={})
    d = _ckpt(tmp_path, "config_fp8.json")
    cfg = json.loads((d / "config.json").read_text())
    g = next(iter(cfg["quantization_config"]["config_groups"].values()))
    g["weights"].update(type="int", num_bits=8)
    g["input_activations"].update(type="int", num_bits=8)
    (d / "config.json").write_text(json.dumps(cfg))
    r = pf.run_preflight(d, s, cpu_flags=cpuinfo_flags(flags), gpus=0, mem_available=64 * pf.GiB)
    assert r.scheme == "W8A8" and not r.warnings
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    assert pf.run_preflight(d, s, cpu_flags=cpuinfo_flags(flags), gpus=0, mem_available=64 * pf.GiB).scheme == "BF16"


def test_static_fp8_refused_on_cpu_served_on_cuda():
    for flags in (AVX2_FLAGS, AMX_FLAGS):
        t = tg.detect_target(cpu_flags=cpuinfo_flags(flags), gpus=0, vllm_cmd=CPU_CMD)
        with pytest.raises(pf.PreflightError, match="static FP8"):
            pf.check_scheme("FP8", t)
    assert pf.check_scheme("FP8", tg.detect_target(cpu_flags=set(), gpus=1, vllm_cmd="vllm")) is None


def test_configured_avx512_on_an_avx2_cpu_is_refused(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path / "st", "target": "cpu-avx512"}, environ={})
    with pytest.raises(pf.PreflightError, match="no AVX512"):
        pf.run_preflight(_ckpt(tmp_path, "config_w4a16.json"), s, cpu_flags=cpuinfo_flags(AVX2_FLAGS), gpus=0)


# ---- a failed deploy says what went wrong and what to try ----------------------------------------------------------

def test_failed_deploy_explains_itself():
    s = DeploySettings.load(environ={})
    avx512 = tg.detect_target(cpu_flags=cpuinfo_flags(AMX_FLAGS), gpus=0, vllm_cmd=CPU_CMD)
    err = HealthError("POST http://127.0.0.1:8100/v1/completions failed: timed out")
    msg = explain_failure(err, "FP8_DYNAMIC", avx512, s)
    assert msg.startswith("deploy failed: the health check timed out")
    assert "scheme FP8_DYNAMIC runs through a slow fallback on cpu-avx512" in msg
    assert "Try: quantize with method w8a8" in msg and msg.endswith(str(err))
    msg = explain_failure(err, "W8A8", avx512, s)
    assert "slow fallback" not in msg and "QUANTPIPE_DEPLOY_REQUEST_TIMEOUT_S" in msg
    died = HealthError("vLLM pid 7 died during the health check; log:\n...")
    msg = explain_failure(died, "W4A16_ASYM", avx512, s)
    assert "died on its first completions" in msg and "QUANTPIPE_DEPLOY_TARGET" in msg


def test_server_scratch_leaves_room_for_vllm_ipc_sockets(tmp_path):
    """vLLM binds ZeroMQ sockets at $TMPDIR/<uuid4>; a Unix socket path holds at most 107 bytes."""
    deep = tmp_path / ("d" * 90) / "state"
    for state in (tmp_path, deep):
        env = build_env(DeploySettings.load({"state_dir": state}, environ={}), None, "cpu-avx2")
        sock = Path(env["TMPDIR"]) / "3cd723f5-381a-4483-834d-b4f3dfeea905"
        assert len(str(sock)) <= 107, sock
        assert Path(env["TMPDIR"]).is_dir()
    assert env["TMPDIR"] != str(deep / "tmp")
    other = build_env(DeploySettings.load({"state_dir": tmp_path / ("e" * 90)}, environ={}), None, "cpu-avx2")
    assert other["TMPDIR"] != env["TMPDIR"], "two state folders share one scratch"
