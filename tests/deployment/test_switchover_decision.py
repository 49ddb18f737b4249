"""The switch-over decision (beside or drain-and-replace) on fake memory readings, every branch; the
memory readers on fake nvidia-smi / torch / meminfo output; the per-target defaults (CUDA: graphs on,
GPU-sized limits)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from quantpipe.deployment import placement as pl
from quantpipe.deployment.server import build_argv, build_env
from quantpipe.deployment.settings import TARGET_DEFAULTS, DeploySettings
from quantpipe.errors import PipelineError

GiB = pl.GiB
H200 = 143771 * 2 ** 20  # nvidia-smi's memory.total of an H200, MiB


def cpu(avail_gib: float | None, error: str | None = None) -> pl.MemoryReading:
    return pl.MemoryReading("cpu", "fake meminfo", available_bytes=None if avail_gib is None else int(avail_gib * GiB),
                            error=error)


def gpus(*free_gib: float, total: int = H200) -> pl.MemoryReading:
    return pl.MemoryReading("cuda", "fake nvidia-smi",
                            gpus=tuple(pl.GpuMemory(i, int(f * GiB), total) for i, f in enumerate(free_gib)))


def decide(**kw) -> pl.SwitchPlan:
    args = {"target": "cpu-avx512", "old_alive": True, "reading": cpu(16), "need_bytes": 4 * GiB, **kw}
    return pl.decide_switchover(**args)


# ---- every branch ----------------------------------------------------------------------------------------------------

def test_nothing_to_replace_is_fresh():
    p = decide(old_alive=False, reading=None)
    assert p.mode == "fresh" and "nothing to replace" in p.reason


@pytest.mark.parametrize("configured", ["beside", "drain-and-replace"])
def test_a_configured_mode_wins_over_the_memory(configured):
    p = decide(configured=configured, reading=cpu(0.1), old_devices=[3])
    assert p.mode == configured and p.reason == f"configured: switchover={configured}" + \
        (" (memory not checked)" if configured == "beside" else "")
    assert p.devices == ((3,) if configured == "drain-and-replace" else None)


@pytest.mark.parametrize("reading, why", [(None, "nothing was read"), (cpu(None, error="/proc/meminfo unreadable"),
                                                                       "/proc/meminfo unreadable")])
def test_unreadable_memory_replaces(reading, why):
    p = decide(reading=reading)
    assert p.mode == "drain-and-replace" and why in p.reason and "safe choice" in p.reason


def test_cpu_beside_when_both_fit():
    p = decide(reading=cpu(16), need_bytes=4 * GiB)
    assert p.mode == "beside" and "needs ~4.0 GiB + margin 1.0 GiB, 16.0 GiB available" in p.reason
    assert p.memory["available_bytes"] == 16 * GiB and p.devices is None
    assert decide(reading=cpu(5), need_bytes=4 * GiB).mode == "beside"  # need + margin == available: fits


def test_cpu_drain_and_replace_when_both_do_not_fit():
    p = decide(reading=cpu(4.5), need_bytes=4 * GiB)
    assert p.mode == "drain-and-replace" and "only 4.5 GiB is available beside the old server" in p.reason
    assert decide(reading=cpu(4.5), need_bytes=4 * GiB, margin_bytes=0).mode == "beside"


def test_cpu_unknown_need_or_available_replaces():
    assert "need is unknown" in decide(need_bytes=None).reason
    p = decide(reading=cpu(None))
    assert p.mode == "drain-and-replace" and "available host memory unknown" in p.reason


def test_cuda_beside_on_another_gpu_of_the_node():
    # the old server holds GPU 0 (0.9 x 140 GiB taken); GPU 1 is free
    p = decide(target="cuda", reading=gpus(14, 139), old_devices=[0], need_bytes=None)
    assert p.mode == "beside" and p.devices == (1,) and p.reason.startswith("another GPU of the node: GPU(s) [1]")
    assert "GPU 0: 14.0 GiB free" in p.reason and p.as_dict()["devices"] == [1]


def test_cuda_beside_on_the_old_servers_gpu_when_it_has_room():
    # a small budget (0.4 x total) on each server: the old one's GPU holds a second
    p = decide(target="cuda", reading=gpus(80), old_devices=[0], gpu_memory_utilization=0.4, need_bytes=None)
    assert p.mode == "beside" and p.devices == (0,) and "the old server's GPU has room" in p.reason


def test_cuda_drain_and_replace_when_no_gpu_has_room():
    p = decide(target="cuda", reading=gpus(14), old_devices=[0], need_bytes=None)
    assert p.mode == "drain-and-replace" and p.devices == (0,), "the new server takes the GPU the old one frees"
    assert "1 GPU(s) with 0.9 x total + margin 1.0 GiB free are needed beside the old server, 0 found" in p.reason


def test_cuda_tensor_parallel_needs_that_many_gpus():
    two_free = gpus(14, 14, 139, 139)
    p = decide(target="cuda", reading=two_free, old_devices=[0, 1], tensor_parallel_size=2, need_bytes=None)
    assert p.mode == "beside" and p.devices == (2, 3)
    one_free = gpus(14, 14, 139)
    p = decide(target="cuda", reading=one_free, old_devices=[0, 1], tensor_parallel_size=2, need_bytes=None)
    assert p.mode == "drain-and-replace" and p.devices == (0, 1) and "2 GPU(s)" in p.reason and "1 found" in p.reason


def test_cuda_need_larger_than_the_budget_counts():
    # 0.1 x 140 GiB = 14 GiB budget, but the weights alone need 30 GiB
    p = decide(target="cuda", reading=gpus(14, 20), old_devices=[0], gpu_memory_utilization=0.1,
               need_bytes=30 * GiB)
    assert p.mode == "drain-and-replace"
    assert decide(target="cuda", reading=gpus(14, 40), old_devices=[0], gpu_memory_utilization=0.1,
                  need_bytes=30 * GiB).devices == (1,)


def test_cuda_old_devices_unknown_and_no_reading():
    p = decide(target="cuda", reading=gpus(139), old_devices=None, need_bytes=None)
    assert p.mode == "beside" and p.devices == (0,) and p.reason.startswith("free GPU memory")
    p = decide(target="cuda", reading=pl.MemoryReading("cuda", "nvidia-smi", gpus=()), need_bytes=None)
    assert p.mode == "drain-and-replace" and "no GPU memory reading" in p.reason


def test_the_decision_is_logged(tmp_path, caplog):
    from quantpipe.deployment.server import ServerHandle
    from quantpipe.deployment.switchover import plan_switchover

    s = DeploySettings.load({"state_dir": tmp_path}, environ={})
    t = s.serving_target(cpu_flags={"avx2"}, gpus=0)
    old = ServerHandle(pid=1, start_ticks=0, host="127.0.0.1", port=8100, model_dir="", served_model_name="m",
                       log_path="", launched_at=0, argv=[])
    with caplog.at_level(logging.INFO, logger="quantpipe.deployment.switchover"):
        p = plan_switchover(s, t, old, 4 * GiB, cpu(2))
    assert p.mode == "drain-and-replace"
    assert any(r.message.startswith("switch-over decision: drain-and-replace (host memory: the new server needs")
               for r in caplog.records)


# ---- readers -----------------------------------------------------------------------------------------------------------

SMI = "0, 14000, 143771\n1, 143000, 143771\n2, 100, 143771\n"


def fake_run(outputs: dict):
    """subprocess.run stand-in: answers by the program's name."""
    calls = []

    def run(argv, **kw):
        calls.append((argv, kw))
        name = Path(argv[0]).name
        rc, out = outputs.get(name, (127, ""))
        return subprocess.CompletedProcess(argv, rc, out, "boom" if rc else "")
    run.calls = calls
    return run


def test_parse_nvidia_smi():
    g = pl.parse_nvidia_smi(SMI)
    assert g[0] == pl.GpuMemory(0, 14000 * 2 ** 20, 143771 * 2 ** 20) and [x.index for x in g] == [0, 1, 2]
    with pytest.raises(ValueError):
        pl.parse_nvidia_smi("0, 12")


def test_read_gpu_memory_from_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    run = fake_run({"nvidia-smi": (0, SMI)})
    r = pl.read_gpu_memory(["vllm"], {"PATH": str(tmp_path)}, run=run)
    assert r.source == "nvidia-smi" and len(r.gpus) == 3 and r.error is None
    assert "--query-gpu=index,memory.free,memory.total" in run.calls[0][0]
    r = pl.read_gpu_memory(["vllm"], {"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "1,2"}, run=run)
    assert [g.index for g in r.gpus] == [1, 2]


def test_read_gpu_memory_falls_back_to_torch_in_the_serving_env(tmp_path):
    py = tmp_path / "python3"
    py.write_text("")
    py.chmod(0o755)
    vllm = tmp_path / "vllm"
    vllm.write_text(f"#!{py}\nimport vllm\n")
    vllm.chmod(0o755)
    assert pl.serving_python([str(vllm)]) == str(py) and pl.serving_python([str(py), "x.py"]) == str(py)
    rows = json.dumps([[0, 10 * GiB, 80 * GiB], [1, 70 * GiB, 80 * GiB]])
    run = fake_run({"python3": (0, "noise\n" + rows + "\n")})
    r = pl.read_gpu_memory([str(vllm)], {"PATH": "/nonexistent", "CUDA_VISIBLE_DEVICES": "4,6"}, run=run)
    assert r.source.startswith("torch.cuda.mem_get_info") and [(g.index, g.free_bytes) for g in r.gpus] == \
        [(4, 10 * GiB), (6, 70 * GiB)], "torch's 0..n-1 mapped back to the visible indices"
    assert run.calls[0][1]["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    r = pl.read_gpu_memory([str(vllm)], {"PATH": "/nonexistent"}, run=fake_run({}))
    assert r.error and "nvidia-smi not found" in r.error and "torch probe exit 127" in r.error
    assert decide(target="cuda", reading=r).mode == "drain-and-replace"


def test_read_cpu_memory(tmp_path):
    m = tmp_path / "meminfo"
    m.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert pl.read_cpu_memory(m).available_bytes == 20000000 * 1024
    assert "unreadable" in pl.read_cpu_memory(tmp_path / "none").error
    m.write_text("MemTotal: 1 kB\n")
    assert "no MemAvailable" in pl.read_cpu_memory(m).error
    assert pl.read_cpu_memory().available_bytes > 0  # this host


# ---- per-target defaults ---------------------------------------------------------------------------------------------

def test_each_target_gets_its_defaults_from_one_table(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path}, environ={})
    assert s.max_model_len is None and not s.is_resolved
    gpu, cpu_ = s.resolved("cuda"), s.resolved("cpu-avx2")
    for got, kind in ((gpu, "cuda"), (cpu_, "cpu")):
        assert {f: getattr(got, f) for f in TARGET_DEFAULTS[kind]} == TARGET_DEFAULTS[kind]
    assert gpu.enforce_eager is False and gpu.max_num_seqs > cpu_.max_num_seqs and \
        gpu.max_model_len > cpu_.max_model_len
    assert s.resolved("cpu-avx512").max_model_len == 2048 and gpu.resolved("cpu-avx2") is gpu  # idempotent
    # CUDA graphs on a GPU (no --enforce-eager), eager on CPU; the limits follow the target
    g = build_argv(s, tmp_path, "m", 8100, "cuda")
    c = build_argv(s, tmp_path, "m", 8100, "cpu-avx512")
    assert "--enforce-eager" not in g and "--enforce-eager" in c
    assert g[g.index("--max-num-seqs") + 1] == "256" and c[c.index("--max-num-seqs") + 1] == "8"
    assert g[g.index("--max-model-len") + 1] == "8192" and c[c.index("--max-model-len") + 1] == "2048"


def test_explicit_limits_win_and_the_model_caps_the_default(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path}, environ={"QUANTPIPE_DEPLOY_ENFORCE_EAGER": "true",
                                                              "QUANTPIPE_DEPLOY_MAX_NUM_SEQS": "32"})
    r = s.resolved("cuda")
    assert r.enforce_eager is True and r.max_num_seqs == 32 and r.max_model_len == 8192
    assert s.resolved("cuda", max_position_embeddings=4096).max_model_len == 4096
    assert DeploySettings.load({"max_model_len": 16384}, environ={}).resolved("cuda", 4096).max_model_len == 16384
    with pytest.raises(PipelineError, match="without chunked prefill"):
        DeploySettings.load({"enable_chunked_prefill": False, "max_model_len": 4096}, environ={}).resolved("cpu-avx2")


def test_a_server_is_pinned_to_the_gpus_chosen(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path}, environ={})
    env = build_env(s, None, "cuda", [2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "CUDA_VISIBLE_DEVICES" not in build_env(s, None, "cpu-avx2", [2])
