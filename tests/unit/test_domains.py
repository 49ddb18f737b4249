"""Held-out domains: shipped offline with licences, a user's JSONL refused with a clear message,
windows that never cross a domain."""

import json

import pytest

from quantpipe.assets.domains import BUILTIN_DOMAINS, LICENSES, heldout_for, structured_rows, user_domains
from quantpipe.errors import PipelineError
from quantpipe.pipeline import validate_params
from quantpipe.store import Store


def test_builtin_domains_ship_offline_with_licences(cache_dir):
    domains, digest = heldout_for(cache_dir, BUILTIN_DOMAINS, None)
    assert list(domains) == list(BUILTIN_DOMAINS) and set(LICENSES) == set(BUILTIN_DOMAINS)
    assert len(domains["math"]) == 1319 and "####" in domains["math"][0]["text"]
    assert len(domains["code"]) == 164 and "def " in domains["code"][0]["text"]
    assert all("messages" in r and r["messages"][1]["role"] == "assistant" for r in domains["chat"][:5])
    again, digest2 = heldout_for(cache_dir, BUILTIN_DOMAINS, None)
    assert digest == digest2 and structured_rows() == structured_rows()  # deterministic


def test_user_domains_are_parsed_and_refused_with_the_line(tmp_path, cache_dir):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"text": "SELECT * FROM t;", "domain": "sql"}) + "\n" +
                    json.dumps({"text": "hello"}) + "\n")
    assert {k: len(v) for k, v in user_domains(good).items()} == {"sql": 1, "user": 1}
    domains, digest = heldout_for(cache_dir, ("prose",), str(good))
    assert list(domains) == ["prose", "sql", "user"]
    assert digest != heldout_for(cache_dir, ("prose",), None)[1]
    for text, msg in (("{not json", "mine.jsonl:1: not valid JSON"), ('{"text": ""}', "non-empty string field 'text'"),
                      ('{"text": "x", "domain": "code"}', "built-in domain")):
        good.write_text(text + "\n")
        with pytest.raises(PipelineError, match=msg):
            user_domains(good)
    with pytest.raises(PipelineError, match="does not exist"):
        user_domains(tmp_path / "missing.jsonl")


def test_a_broken_domain_file_is_refused_before_any_work(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(PipelineError, match="bad.jsonl:1"):
        validate_params({"eval_domains_path": str(bad)}, store=Store.local())


def test_heldout_windows_never_cross_a_domain(model_dir, cache_dir):
    from transformers import AutoTokenizer

    from quantpipe.validation.metrics import heldout_segments

    tok = AutoTokenizer.from_pretrained(model_dir)
    domains, _ = heldout_for(cache_dir, BUILTIN_DOMAINS, None)
    ids, windows, skipped = heldout_segments(tok, domains, 300, 128)
    assert not skipped and sum(n for _, n, _ in windows) == len(ids)
    per = {d: sum(n for _, n, dd in windows if dd == d) for d in BUILTIN_DOMAINS}
    assert all(256 <= v <= 300 for v in per.values()), per
    assert [s for s, _, _ in windows] == sorted(s for s, _, _ in windows)
    chat = [ids[s:s + n] for s, n, d in windows if d == "chat"][0]
    assert tok.convert_tokens_to_ids("<|im_start|>") in chat  # rendered with the model's chat template
