"""lm-eval through the batched engine scores every item as lm-eval's own HF backend does."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_batched_lm_gives_hflm_scores_per_item(model_dir, cache_dir, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from quantpipe.assets.tasks import builtin_tasks
    from quantpipe.validation import accuracy
    from quantpipe.validation.engine import resolve_placement
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
