import pytest

from quantpipe.quantization import gpu_profile


def test_activation_cache_decides_placement():
    lens = [2048] * 128
    acts = gpu_profile.activation_cache_bytes(lens, 4096)
    assert acts == 2 * 128 * 2048 * 4096 * 2  # held twice while a layer replaces its inputs
    big = gpu_profile.gpu_oneshot_kwargs(32, sample_lengths=lens, hidden_size=4096, model_bytes=16 << 30,
                                         gpu_free_bytes=80 << 30)
    assert big == {"pipeline": "sequential", "sequential_offload_device": "cuda"}
    small = gpu_profile.gpu_oneshot_kwargs(32, sample_lengths=lens, hidden_size=4096, model_bytes=16 << 30,
                                           gpu_free_bytes=2 << 30)
    assert small["sequential_offload_device"] == "cpu"
    with pytest.raises(ValueError):
        gpu_profile.gpu_oneshot_kwargs(0)
