"""llm-compressor's distributed oneshot, run by the product on the CPU: two gloo processes
under torchrun against one process, on the small real model, the same recipe and calibration.

The two runs differ only in the order of the float sums that build GPTQ's Hessians, which
flips some rounding decisions (GPTQ's column-by-column updates amplify last-bit
differences; see ``gpu_profile``). Stated tolerances: int4 codes within one step of each
other at 99 % and equal at 50 %; the two candidates' divergence from the unquantized model
(mean KL of next-token distributions over 512 positions of text outside the calibration
set) within a factor of two of each other. With eight calibration samples and four-bit
codes the KL moves a lot with a few flipped roundings, and how many flip depends on the
CPU's float sums: seen on an AVX512 host 83.8 % of codes equal, 99.6 % within one step,
KL 0.0340 (one process) and 0.0408 (two); on CI's host KL 0.0340 and 0.0596 (ratio 1.75).
A tighter bound would test the host's arithmetic, not the hand-off of Hessians."""

from __future__ import annotations

import json

import pytest

from quantpipe.artifacts import ArtifactStore, uri_to_path
from quantpipe.quantization.run import PROVENANCE, quantize
from quantpipe.settings import QuantEngine, QuantSettings

pytestmark = pytest.mark.slow
# four of thirty layers are quantized: the solves dominate a CPU run, and four show the
# hand-off of Hessians and solved weights between ranks (28 Linears spread over two) as
# well as thirty
SETTINGS = QuantSettings(method="gptq", bits=4, group_size=64,
                         ignore=("lm_head", r"re:model\.layers\.([4-9]|[12][0-9])\..*"))


def _samples(model_dir, corpus_dir, n=8, length=128, start=0):
    from transformers import AutoTokenizer

    from quantpipe.assets.corpus import read_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(" ".join(read_texts(corpus_dir / "calibration.jsonl")[:100]))["input_ids"][start:]
    assert len(ids) >= n * length
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _codes(folder):
    from safetensors.torch import load_file

    t = load_file(folder / "model.safetensors")
    return {k: v for k, v in t.items() if k.endswith("weight_packed")}, t


def _logprobs(folder, rows):
    import torch

    from quantpipe.validation.engine.placement import resolve_placement
    from quantpipe.validation.metrics import load_model

    model, _ = load_model(folder, resolve_placement())
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(rows)).logits.float(), -1).flatten(0, 1)


def test_two_processes_quantize_like_one(tmp_path, model_dir, corpus_dir):
    import torch

    samples = _samples(model_dir, corpus_dir)
    one = quantize(ArtifactStore(tmp_path / "one"), model_dir, "h", SETTINGS, samples, "c", 128,
                   engine=QuantEngine(procs=1))
    two = quantize(ArtifactStore(tmp_path / "two"), model_dir, "h", SETTINGS, samples, "c", 128,
                   engine=QuantEngine(procs=2))
    assert one.key != two.key  # the process layout is part of the artifact's identity
    f1, f2 = uri_to_path(one.uri), uri_to_path(two.uri)
    prov = json.loads((f2 / PROVENANCE).read_text())
    assert prov["placement"]["plan"]["procs"] == 2 and prov["placement"]["samples_per_rank"] == [4, 4]
    assert json.loads((f1 / PROVENANCE).read_text())["placement"]["plan"]["procs"] == 1

    c1, t1 = _codes(f1)
    c2, t2 = _codes(f2)
    assert t1.keys() == t2.keys() and len(c1) == 4 * 7  # four layers x seven Linears, the rest dense
    for k in t1:
        assert t1[k].shape == t2[k].shape, k
        if not (k.endswith("weight_packed") or k.endswith("weight_scale") or k.endswith("weight_zero_point")):
            assert torch.equal(t1[k], t2[k]), f"{k}: an unquantized tensor differs"
    equal = near = total = 0
    for k in c1:
        for i in range(8):  # eight int4 codes per int32
            a, b = (c1[k] >> (4 * i)) & 0xF, (c2[k] >> (4 * i)) & 0xF
            equal += (a == b).sum().item()
            near += ((a - b).abs() <= 1).sum().item()
            total += a.numel()
    assert near / total >= 0.99, f"only {near / total:.4f} of int4 codes within one step"
    assert equal / total >= 0.5, f"only {equal / total:.4f} of int4 codes equal"

    held = _samples(model_dir, corpus_dir, n=4, length=128, start=2000)  # text no calibration sample holds
    base, q1, q2 = (_logprobs(f, held) for f in (model_dir, f1, f2))

    def kl(p, q):
        return (p.exp() * (p - q)).sum(-1).mean().item()

    k_one, k_two = kl(base, q1), kl(base, q2)
    print(f"int4 codes equal {equal / total:.4f}, within one step {near / total:.4f}; mean KL to the "
          f"unquantized model: one process {k_one:.5f}, two {k_two:.5f}, between them {kl(q1, q2):.5f}")
    assert k_one > 1e-4 and k_two > 1e-4, "quantization left the model unchanged"
    assert max(k_one, k_two) <= 2.0 * min(k_one, k_two), (k_one, k_two)


def test_distributed_failure_is_an_error_with_the_log(tmp_path, model_dir):
    from quantpipe.errors import QuantizationError
    from quantpipe.quantization import distributed

    spec = {"checkpoint": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "samples": [[1, 2, 3]] * 2,
            "max_seq_length": 8, "settings": SETTINGS.model_dump(mode="json"), "device": "cpu",
            "host_bytes": 1 << 30, "offload_folder": None, "model_bytes": 1}
    with pytest.raises(QuantizationError, match=r"(?s)2 processes\) failed with exit code 1:.*missing"):
        distributed.launch(spec, 2, tmp_path / "wd", timeout_s=300)
