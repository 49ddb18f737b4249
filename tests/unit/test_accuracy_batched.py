"""lm-eval through the batched engine scores every item as lm-eval's own HF backend does."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_batched_lm_gives_hflm_scores_per_item(model_dir, cache_dir, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from quantpipe.assets.tasks import builtin_tasks
    from quantpipe.validation import accuracy
    from quantpipe.validation.engine.placement import resolve_placement
    from quantpipe.validation.metrics import load_model

    tasks = builtin_tasks(cache_dir)
    model, tok = load_model(model_dir)
    names = ["qp_piqa", "qp_asdiv"]  # log-likelihood and generation
    batched = accuracy.task_accuracy(model, tok, tasks, names, limit=6)
    calls = []

    def plain(model, tokenizer, placement, max_length=1024):
        calls.append(placement.kind)
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=max_length, device="cpu")

    monkeypatch.setattr(accuracy, "batched_lm", plain)
    reference = accuracy.task_accuracy(model, tok, tasks, names, limit=6)
    assert calls == [resolve_placement().kind]
    for name in names:
        assert batched["tasks"][name]["n"] == 6
        assert batched["tasks"][name]["per_item"] == reference["tasks"][name]["per_item"], name


def test_batched_lm_tokenizes_and_scores_requests_like_hflm(model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from quantpipe.validation import accuracy
    from quantpipe.validation.engine.placement import resolve_placement
    from quantpipe.validation.metrics import load_model

    model, tok = load_model(model_dir)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=1024, device="cpu")
    lm = accuracy.batched_lm(model, tok, resolve_placement())
    bos = tok.decode(ref.prefix_token_id)
    pairs = [("Question: Why is the sky blue?\nAnswer:", " Rayleigh scattering"),
             ("The cat sat ", "on the mat"),  # trailing space moves to the continuation
             ("The cat sat ", "under the table"),  # same context, another choice
             (bos + "Hello", " world"),  # already starts with BOS: no second one
             ("", "Hello there")]  # empty context: lm-eval's own path
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    enc = accuracy._prefetch_encodings(lm, reqs)
    assert len(enc) == 7  # context and whole text of each non-empty pair, the shared context once
    assert all(enc[s] == ref.tok_encode(s) for s in enc)
    got = lm.loglikelihood(reqs)
    # one at a time: lm-eval's HF backend shares one forward among requests whose inputs
    # coincide ([BOS, "Hello"] here) and then scores the BOS pair wrongly (-10.77, alone -9.17)
    want = [ref.loglikelihood([r])[0] for r in reqs]
    for (lp, greedy), (wlp, wgreedy) in zip(got, want):
        assert lp == pytest.approx(wlp, abs=1e-3)
        assert greedy == wgreedy
