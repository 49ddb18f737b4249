"""The batched evaluation engine gives the figures of the one-request-at-a-time path."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_window_batches_keep_order_and_equal_lengths():
    from quantpipe.validation.engine.packing import window_batches

    ws = [[1] * 4, [2] * 4, [3] * 4, [4] * 4, [5] * 4, [6] * 2]
    groups = list(window_batches(ws, 2))
    assert [len(g) for g in groups] == [2, 2, 1, 1]
    assert [w for g in groups for w in g] == ws
    assert all(len({len(w) for w in g}) == 1 for g in groups)


def test_batched_perplexity_matches_one_window_at_a_time(tiny):
    from quantpipe.validation.metrics import perplexity

    ids = _ids(7 * 32 + 9, 1)  # 7 full windows and a short last one
    one = perplexity(tiny, ids, 32)
    many = perplexity(tiny, ids, 32, batch=4)
    assert one["tokens"] == many["tokens"] == len(ids) - 8
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert many["top1"] == one["top1"]
    assert torch.allclose(many["dist"]["topk_logp"].float(), one["dist"]["topk_logp"].float(), atol=1e-2)
    ref = perplexity(tiny, ids, 32, reference=one["dist"], batch=3)
    assert ref["kl"]["mean"] < 1e-3
    # against a plain log_softmax over the full model output, window by window
    nll, top1, topk = 0.0, [], []
    with torch.inference_mode():
        for i in range(0, len(ids), 32):
            w = torch.tensor([ids[i:i + 32]])
            if w.shape[1] < 2:
                continue
            lp = torch.log_softmax(tiny(input_ids=w).logits[0, :-1].float(), -1)
            nll -= float(lp.gather(1, w[0, 1:, None]).sum())
            top1 += lp.argmax(-1).tolist()
            topk.append(lp.topk(32, -1).values)
    assert one["perplexity"] == pytest.approx(math.exp(nll / len(top1)), rel=1e-5)
    assert one["top1"] == top1
    assert torch.allclose(one["dist"]["topk_logp"].float(), torch.cat(topk), atol=2e-3)


def _naive_loglik(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    rows = lp[len(ctx) - 1:-1]
    tgt = torch.tensor(cont)
    return float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


@pytest.mark.parametrize("pack", [0, 64, 16])  # padded rows; packed rows; a width below the longest
def test_batched_loglikelihoods_match_single_requests(tiny, pack):
    from quantpipe.validation.engine.packing import loglikelihoods

    reqs = [(_ids(5 + 7 * i % 40, i), _ids(1 + i % 5, 100 + i)) for i in range(23)]
    # a continuation that is the model's own greedy choice must be reported as greedy
    ctx = _ids(12, 999)
    with torch.inference_mode():
        nxt = int(tiny(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    reqs.append((ctx, [nxt]))
    got = loglikelihoods(tiny, reqs, token_budget=120, pack=pack)  # several batches
    for (c, k), (lp, greedy) in zip(reqs, got):
        want_lp, want_greedy = _naive_loglik(tiny, c, k)
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    assert got[-1][1] is True


@pytest.mark.parametrize("pack", [0, 64])
def test_one_token_choices_of_one_context_share_its_forward(tiny, pack, monkeypatch):
    """Lettered multiple choice (MMLU's " A".." D"): each choice scored as if alone, from one
    forward of the shared context."""
    from quantpipe.validation.engine import packing

    reqs = []
    for i in range(6):
        ctx = _ids(8 + 5 * i, 300 + i)
        reqs += [(ctx, [t]) for t in (3, 17, 42, 88)] + [(ctx, _ids(3, 400 + i))]  # + one longer choice
    order = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(1)).tolist()
    reqs = [reqs[i] for i in order]
    rows = []
    real = packing.parts  # loglikelihoods looks ``parts`` up in its own module

    def counting(model):
        body, head = real(model)
        return (lambda **kw: rows.append(int((kw["input_ids"] != -1).shape[0])) or body(**kw)), head

    monkeypatch.setattr(packing, "parts", counting)
    got = packing.loglikelihoods(tiny, reqs, token_budget=10_000, pack=pack)
    for (c, k), (lp, greedy) in zip(reqs, got):
        want_lp, want_greedy = _naive_loglik(tiny, c, k)
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    assert rows  # the forwards went through the patched body
    if not pack:  # one padded row per distinct request: 6 contexts + 6 longer choices, not 30
        assert sum(rows) == 12


def test_pack_rows_first_fit_longest_first():
    from quantpipe.validation.engine.packing import pack_rows

    lengths = [5, 9, 3, 7, 2, 12, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert rows[0] == [5]  # longer than the width: a row of its own
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows[1:])
    assert rows[1:] == [[1], [3, 2], [0, 6], [4]]  # 9 | 7+3 | 5+4 | 2
    assert pack_rows([], 8) == []


def test_batched_greedy_matches_generate_and_stops_at_eos(tiny):
    from quantpipe.validation.engine.decoding import greedy

    prompts = [_ids(n, 50 + n) for n in (3, 9, 17, 5)]
    want = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p])
            out = tiny.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    assert greedy(tiny, prompts, 10, pad_id=0) == want
    stop = want[1][3]  # the fourth token of row 1: that row must end right after it
    cut = greedy(tiny, prompts, 10, pad_id=0, stop_ids=[stop])
    assert cut[1] == want[1][:want[1].index(stop) + 1]
    for row, full in zip(cut, want):
        assert row == full[:full.index(stop) + 1] if stop in full else row == full


def _generate(model, prompts, n):
    want = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    return want


def test_greedy_shares_a_common_prefix_and_packs_prompts(tiny, monkeypatch):
    from quantpipe.validation.engine import decoding

    shared = _ids(7, 7)
    prompts = [shared + _ids(n, 70 + n) for n in (1, 9, 4, 13, 2, 6)] + [shared[:5] + [3]]
    assert decoding.common_prefix(prompts) == 5  # the last prompt parts after 5 shared tokens
    assert decoding.common_prefix(prompts[:6]) == 7
    assert decoding.common_prefix([shared, shared]) == 6  # at least one own token each
    want = _generate(tiny, prompts, 8)
    # greedy looks its prefills up in its own module: patched there
    padded, orig = [], decoding._padded_prefill
    monkeypatch.setattr(decoding, "_padded_prefill", lambda *a: padded.append(1) or orig(*a))
    assert decoding.greedy(tiny, prompts, 8, pad_id=0) == want
    assert decoding.greedy(tiny, prompts[:6], 8, pad_id=0) == want[:6]
    # small rows and a small budget: several packed rows, several prefill forwards
    assert decoding.greedy(tiny, prompts, 8, pad_id=0, token_budget=40, row=20) == want
    # the padded prefill (for caches the packed one cannot fill) gives the same tokens
    assert padded == []  # all of the above went through the packed prefill
    monkeypatch.setattr(decoding, "_packed_prefill", lambda *a, **k: None)
    assert decoding.greedy(tiny, prompts, 8, pad_id=0) == want
    assert padded == [1]


def test_grouped_query_attention_without_copies_gives_the_same_outputs(tiny):
    from quantpipe.validation.engine.attention import attention_kernels
    from quantpipe.validation.engine.decoding import greedy
    from quantpipe.validation.engine.packing import loglikelihoods
    from quantpipe.validation.engine.placement import resolve_placement

    assert tiny.config.num_attention_heads // tiny.config.num_key_value_heads == 2  # a GQA model
    calls = []
    placement = resolve_placement()
    prompts = [_ids(7, 7) + _ids(n, 70 + n) for n in (1, 9, 4)] + [_ids(5, 5)]
    reqs = [(_ids(5 + 3 * i, i), _ids(1 + i % 4, 100 + i)) for i in range(9)]
    want_gen = greedy(tiny, prompts, 8, pad_id=0)
    want_ll = loglikelihoods(tiny, reqs, 120, pack=64)
    with attention_kernels(placement):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        folded = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = lambda *a, **k: calls.append(a[4] is not None) or folded(*a, **k)
        got_gen = greedy(tiny, prompts, 8, pad_id=0)
        got_ll = loglikelihoods(tiny, reqs, 120, pack=64)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = folded
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping  # removed on exit
    assert calls and all(calls)  # every attention call had a mask: all went through the fold
    assert got_gen == want_gen
    for (lp, g), (wlp, wg) in zip(got_ll, want_ll):
        assert lp == pytest.approx(wlp, abs=1e-4) and g == wg


def test_placement_cpu_defaults_and_bad_environment(monkeypatch):
    from quantpipe.settings import EvalEngine
    from quantpipe.validation.engine.placement import resolve_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = resolve_placement(EvalEngine())
    assert (p.device, p.dtype, p.ppl_batch, p.cuda_graph) == ("cpu", "float32", 1, False)
    assert p.kind == "cpu-float32"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_placement(EvalEngine(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    g = resolve_placement(EvalEngine(ppl_batch=8))
    assert (g.device, g.dtype, g.ppl_batch, g.kind) == ("cuda", "bfloat16", 8, "cuda-bfloat16")
    monkeypatch.setenv("QUANTPIPE_EVAL_PPL_BATCH", "0")
    with pytest.raises(ValueError, match="QUANTPIPE_EVAL_"):
        EvalEngine.from_env()
    monkeypatch.setenv("QUANTPIPE_EVAL_PPL_BATCH", "2")
    monkeypatch.setenv("QUANTPIPE_EVAL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        EvalEngine.from_env()


def test_baseline_key_separates_everything_that_changes_the_figures(monkeypatch):
    from quantpipe.prep import baseline
    from quantpipe.settings import EvalSettings

    cpu = baseline.baseline_key("abc", "h1", EvalSettings(), None)
    assert baseline.baseline_key("abc", "h1", EvalSettings(), None, "cpu-float32") == cpu
    assert baseline.baseline_key("abc", "h1", EvalSettings(), None, "cuda-bfloat16") != cpu
    assert baseline.baseline_key("abc", "h2", EvalSettings(), None) != cpu  # other held-out text
    assert baseline.baseline_key("abc", "h1", EvalSettings(task_limit=7), None) != cpu
    monkeypatch.setattr(baseline, "_installed", lambda lib: "0.0.0-other")
    assert baseline.baseline_key("abc", "h1", EvalSettings(), None) != cpu  # other library versions


@pytest.mark.parametrize("q_len", [1, 5])
def test_grouped_query_sdpa_matches_repeated_keys(q_len):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from quantpipe.validation.engine.attention import grouped_query_sdpa

    class Module:
        num_key_value_groups = 4
        is_causal = True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, q_len, 16, generator=g)
    k, v = torch.randn(3, 2, 11, 16, generator=g), torch.randn(3, 2, 11, 16, generator=g)
    mask = torch.rand(3, 1, q_len, 11, generator=g) > 0.3
    mask[..., 0] = True

    def no_fallback(*a, **kw):
        raise AssertionError("a masked GQA call fell back to the copying path")

    got, _ = grouped_query_sdpa(no_fallback)(Module(), q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (3, q_len, 8, 16)
    assert torch.allclose(got, want, atol=1e-5)
    calls = []
    grouped_query_sdpa(lambda *a, **kw: calls.append(1) or (None, None))(Module(), q, k, v, None)
    assert calls == [1]  # no mask: transformers' own path


class _PoolStream:
    """Stands for torch.cuda.Stream: handles handed out round-robin from a small pool."""

    made = 0

    def __init__(self, pool: int):
        self.cuda_stream = 1000 + _PoolStream.made % pool
        _PoolStream.made += 1


def test_dedicated_streams_never_share_a_cuda_handle(monkeypatch):
    from quantpipe.validation.engine import streams

    kept: dict = {}  # dedicated_stream reads the registry of its own module: patched there
    monkeypatch.setattr(streams, "_streams", kept)
    _PoolStream.made = 0
    new = lambda p: _PoolStream(4)  # noqa: E731
    # per-call streams from the pool come back to the same handle: what went wrong before
    assert {_PoolStream(4).cuda_stream for _ in range(8)} == {1000, 1001, 1002, 1003}
    side0 = streams.dedicated_stream("side-0", -1, new)
    for _ in range(3):  # other code takes pool streams: the pool's next handle is side-0's again
        _PoolStream(4)
    side1 = streams.dedicated_stream("side-1", 0, new)
    capture = streams.dedicated_stream("graph-capture", 0, new)
    handles = [side0.cuda_stream, side1.cuda_stream, capture.cuda_stream]
    assert len(set(handles)) == 3, handles
    assert set(kept) == {("side-0", -1), ("side-1", 0), ("graph-capture", 0)}
    # the same role gets the same stream on every call, whatever the pool did in between
    for _ in range(10):
        _PoolStream(4)
        assert streams.dedicated_stream("graph-capture", 0, new) is capture
        assert streams.dedicated_stream("side-1", 0, new) is side1
    streams.dedicated_stream("extra", 0, new)
    with pytest.raises(RuntimeError, match="no CUDA stream"):
        streams.dedicated_stream("one-too-many", 0, new)
