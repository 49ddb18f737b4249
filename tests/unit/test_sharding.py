"""Evaluation split over GPUs: when, over how many, and where each module goes (decided
from the config and the GPUs' free memory; no GPU needed)."""

from __future__ import annotations

import json

import pytest

from quantpipe.validation.engine.placement import Placement
from quantpipe.validation.sharding import (GIB, ShardingError, dense_bytes, device_map, gpus_needed, load_kwargs,
                                           placed)

LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
H200 = 139 * GIB


def test_dense_bytes_of_llama_70b():
    params = dense_bytes(LLAMA_70B) / 2
    assert 70.4e9 < params < 70.8e9  # Llama-3-70B: 70.6 B parameters


def test_gpus_needed():
    w = dense_bytes(LLAMA_70B)  # 131 GiB in bf16
    assert gpus_needed(w, [H200]) == 0  # one H200 cannot hold it with its reserve
    assert gpus_needed(w, [H200, H200]) == 2
    assert gpus_needed(w, [H200] * 4) == 2  # as few as hold it
    assert gpus_needed(16 * GIB, [H200, H200]) == 1
    assert gpus_needed(w, [80 * GIB, 80 * GIB]) == 0  # two A100-80GB: not with the reserve
    assert gpus_needed(w, [80 * GIB] * 3) == 3


def test_device_map_keeps_shared_modules_on_the_first_gpu():
    m = device_map(80, 2)
    assert [m[f"model.layers.{i}"] for i in (0, 39, 40, 79)] == [0, 0, 1, 1]
    assert m["lm_head"] == m["model.embed_tokens"] == m["model.norm"] == 0
    m3 = device_map(10, 3)
    runs = [m3[f"model.layers.{i}"] for i in range(10)]
    assert runs == sorted(runs) and set(runs) == {0, 1, 2}


def _placement(**kw):
    base = dict(device="cuda", dtype="bfloat16", ppl_batch=4, token_budget=32768, gen_batch=256, cuda_graph=True,
                overlap=True)
    return Placement(**{**base, **kw})


def test_placed_splits_only_what_does_not_fit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    p = placed(tmp_path, _placement(), free=[H200, H200])
    assert (p.shard_gpus, p.cuda_graph, p.overlap) == (2, False, False)
    assert placed(tmp_path, p, free=[H200, H200]) is p  # idempotent
    assert load_kwargs(tmp_path, p)["device_map"]["model.layers.79"] == 1
    with pytest.raises(ShardingError, match=r"do not fit the 1 GPU\(s\)"):
        placed(tmp_path, _placement(), free=[H200])
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**LLAMA_70B, "num_hidden_layers": 8}))
    same = _placement()
    assert placed(small, same, free=[H200, H200]) is same
    assert load_kwargs(small, same) == {"device_map": "cuda"}
    assert placed(small, _placement(shard="always"), free=[H200, H200]).shard_gpus == 2
    assert placed(tmp_path, _placement(shard="never"), free=[H200]).shard_gpus == 1
    cpu = _placement(device="cpu", dtype="float32")
    assert placed(tmp_path, cpu, free=[]) is cpu
