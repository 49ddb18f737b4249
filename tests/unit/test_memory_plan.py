"""The quantization memory plan: where the model is held, how many processes, and the
refusals that name what is short (no weights loaded, no GPU needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from quantpipe.quantization.memory_plan import (GIB, GPU_RESERVE, HOST_RESERVE, MemoryPlanError, ModelSize,
                                                Resources, plan_quantization)

# a 70B-shaped layer (hidden 8192, intermediate 28672, 8 KV heads) in bf16
L70 = (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672) * 2
H70 = 4 * (6 * 8192 ** 2 + 28672 ** 2)
M70 = ModelSize(total_bytes=80 * L70 + 2 * 128256 * 8192 * 2, layers=80, largest_layer_bytes=L70,
                hidden_size=8192, hessian_bytes=H70)
H200 = 140 * GIB
CALIB = [2048] * 128


def test_70b_on_two_h200s_is_distributed_and_held_in_shared_memory():
    res = Resources(gpu_free=(H200, H200), host_available=250 * GIB, shm_bytes=200 * GIB, disk_free=100 * GIB)
    plan = plan_quantization(M70, res, method="gptq", sample_lengths=CALIB)
    assert (plan.procs, plan.device, plan.hold) == (2, "cuda", "host")
    assert plan.host_bytes == M70.total_bytes and plan.disk_bytes == 0
    # each rank holds half the activation cache: 128 x 2048 x 8192 x 2 bytes x 2 / 2
    assert plan.per_gpu_need == L70 + H70 + 128 * 2048 * 8192 * 2 + GPU_RESERVE


def test_one_process_when_asked_or_when_the_method_does_not_calibrate():
    res = Resources(gpu_free=(H200, H200), host_available=250 * GIB, shm_bytes=200 * GIB, disk_free=100 * GIB)
    assert plan_quantization(M70, res, method="gptq", sample_lengths=CALIB, procs=1).procs == 1
    fp8 = plan_quantization(M70, res, method="fp8", sample_lengths=[])
    assert fp8.procs == 1 and fp8.hold == "host"
    asked = plan_quantization(M70, res, method="fp8", sample_lengths=[], procs=2)
    assert asked.procs == 1 and "not run distributed" in asked.notes[0]


def test_small_model_goes_whole_onto_the_gpu():
    small = ModelSize(total_bytes=16 * GIB, layers=32, largest_layer_bytes=GIB // 2, hidden_size=4096,
                      hessian_bytes=GIB)
    res = Resources(gpu_free=(H200,), host_available=100 * GIB, shm_bytes=50 * GIB, disk_free=100 * GIB)
    assert plan_quantization(small, res, method="gptq", sample_lengths=CALIB).hold == "gpu"


def test_shared_memory_too_small_spills_to_disk_or_refuses():
    res = Resources(gpu_free=(H200, H200), host_available=250 * GIB, shm_bytes=64 * GIB, disk_free=150 * GIB)
    plan = plan_quantization(M70, res, method="gptq", sample_lengths=CALIB)
    assert plan.hold == "host+disk" and plan.host_bytes == 64 * GIB - HOST_RESERVE
    assert plan.host_bytes + plan.disk_bytes == M70.total_bytes and "/dev/shm" in plan.notes[0]
    with pytest.raises(MemoryPlanError, match=r"fits neither shared memory .*raise shm_size"):
        plan_quantization(M70, Resources((H200, H200), 250 * GIB, 64 * GIB, 20 * GIB), method="gptq",
                          sample_lengths=CALIB)
    # one process reads host memory, not /dev/shm
    one = plan_quantization(M70, res, method="gptq", sample_lengths=CALIB, procs=1)
    assert one.hold == "host"


def test_a_layer_that_does_not_fit_the_gpu_is_refused_with_the_figures():
    res = Resources(gpu_free=(80 * GIB,), host_available=250 * GIB, shm_bytes=200 * GIB, disk_free=100 * GIB)
    with pytest.raises(MemoryPlanError, match=r"one decoder layer does not fit a GPU: .*GPTQ Hessians 4\.6 GiB"):
        plan_quantization(M70, Resources((12 * GIB,), 250 * GIB, 200 * GIB, 100 * GIB), method="gptq",
                          sample_lengths=CALIB)
    # activations that do not fit beside a layer go to host memory, which must hold them
    big = [2048] * 1024  # 64 GiB of activations
    plan = plan_quantization(M70, Resources((70 * GIB,), 250 * GIB, 200 * GIB, 100 * GIB), method="gptq",
                             sample_lengths=big)
    assert plan.hold == "host" and "activation cache (64.0 GiB per process) in host memory" in plan.notes[0]
    with pytest.raises(MemoryPlanError, match="activation cache of 2097152 calibration tokens"):
        plan_quantization(M70, Resources((70 * GIB,), 60 * GIB, 200 * GIB, 100 * GIB), method="gptq",
                          sample_lengths=big)
    with pytest.raises(MemoryPlanError, match="sees 1 GPU"):
        plan_quantization(M70, res, method="gptq", sample_lengths=CALIB, procs=2)
    with pytest.raises(MemoryPlanError, match="procs must be"):
        plan_quantization(M70, res, method="gptq", sample_lengths=CALIB, procs=-1)


def test_cpu_worker_plans_one_process_unless_asked():
    res = Resources(gpu_free=(), host_available=20 * GIB, shm_bytes=10 * GIB, disk_free=50 * GIB)
    small = ModelSize(total_bytes=GIB // 4, layers=30, largest_layer_bytes=7 << 20, hidden_size=576,
                      hessian_bytes=17 << 20)
    assert plan_quantization(small, res, method="gptq", sample_lengths=[256] * 32).procs == 1
    two = plan_quantization(small, res, method="w8a8", sample_lengths=[256] * 32, procs=2)
    assert (two.procs, two.device, two.hold) == (2, "cpu", "host")


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * off)


def test_model_size_read_from_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    _safetensors(tmp_path / "a.safetensors", {"model.embed_tokens.weight": ("BF16", [10, 8]),
                                              "model.layers.0.mlp.down_proj.weight": ("BF16", [8, 16]),
                                              "model.layers.0.mlp.up_proj.weight": ("BF16", [16, 8])})
    _safetensors(tmp_path / "b.safetensors", {"model.layers.1.mlp.down_proj.weight": ("BF16", [8, 32]),
                                              "model.layers.1.input_layernorm.weight": ("BF16", [8])})
    m = ModelSize.of(tmp_path)
    assert m.total_bytes == 2 * (80 + 128 + 128 + 256 + 8) and m.layers == 2
    assert m.largest_layer_bytes == 2 * (256 + 8) and m.hidden_size == 8
    assert m.hessian_bytes == 4 * 32 ** 2  # layer 1's down_proj: 32 inputs
    (tmp_path / "a.safetensors").unlink()
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(MemoryPlanError, match="no decoder layers"):
        ModelSize.of(tmp_path)
