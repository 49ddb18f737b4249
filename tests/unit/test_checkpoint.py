import json
import shutil

import pytest

from quantpipe.errors import CheckpointError
from quantpipe.prep.checkpoint import verify_checkpoint
from quantpipe.prep.sources import resolve_model_uri


@pytest.fixture()
def ckpt_copy(model_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(model_dir, dst)
    return dst


def test_builtin_model_verifies(model_dir):
    info = verify_checkpoint(model_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.hidden_size, info.intermediate_size, info.num_layers, info.vocab_size) == (576, 1536, 30, 49152)
    assert 130e6 < info.num_parameters < 140e6
    assert len(info.checkpoint_hash) == 64


def test_hash_is_stable_and_changes_with_content(ckpt_copy, model_dir):
    assert verify_checkpoint(ckpt_copy).checkpoint_hash == verify_checkpoint(model_dir).checkpoint_hash
    (ckpt_copy / "MANIFEST.json").unlink()  # no recorded checksums: edits change the hash instead
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["note"] = "edited"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    assert verify_checkpoint(ckpt_copy).checkpoint_hash != verify_checkpoint(model_dir).checkpoint_hash


def test_altered_weights_fail_the_checksum(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match"):
        verify_checkpoint(ckpt_copy)


def test_truncated_weights_fail_even_without_checksums(ckpt_copy):
    (ckpt_copy / "MANIFEST.json").unlink()
    f = ckpt_copy / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensors need .* truncated or corrupt"):
        verify_checkpoint(ckpt_copy)


def test_garbage_header_fails(ckpt_copy):
    (ckpt_copy / "MANIFEST.json").unlink()
    (ckpt_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_checkpoint(ckpt_copy)


def test_sha256sums_file_is_honoured(ckpt_copy):
    (ckpt_copy / "MANIFEST.json").unlink()
    (ckpt_copy / "SHA256SUMS").write_text("0" * 64 + "  config.json\n")
    with pytest.raises(CheckpointError, match="config.json: sha256"):
        verify_checkpoint(ckpt_copy)


def test_missing_parts(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        verify_checkpoint(ckpt_copy)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                                     "num_hidden_layers": 1, "vocab_size": 10}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle weights are refused"):
        verify_checkpoint(pickled)


def test_resolve_uri(model_dir, cache_dir, tmp_path):
    assert resolve_model_uri("builtin://smollm2-135m-instruct", cache_dir) == model_dir
    assert resolve_model_uri(model_dir.as_uri(), cache_dir) == model_dir
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_model_uri(str(tmp_path / "nope"), cache_dir)
    with pytest.raises(CheckpointError, match="unknown built-in model"):
        resolve_model_uri("builtin://gpt-5", cache_dir)


def _hub_cache(root, model_dir, repo="acme/smollm2-135m", commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache holding the small model, laid out as huggingface_hub writes it
    (blobs by hash, snapshots of links, refs/main): what a worker mounts when it has no hub."""
    import hashlib
    import shutil

    top = root / f"models--{repo.replace('/', '--')}"
    snap = top / "snapshots" / commit
    (top / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "MANIFEST.json":
            blob = top / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(blob)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_resolves_from_the_workers_hub_cache_offline(model_dir, cache_dir, tmp_path, monkeypatch):
    """hf://org/name[@revision] through huggingface_hub's own resolution (no mock), offline."""
    hub = tmp_path / "hub"
    commit = _hub_cache(hub, model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))  # read at import; the worker sets it before starting
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    for uri in ("hf://acme/smollm2-135m", f"hf://acme/smollm2-135m@{commit}"):
        folder = resolve_model_uri(uri, cache_dir)
        assert folder.name == commit
        info = verify_checkpoint(folder)
        assert info.checkpoint_hash == verify_checkpoint(model_dir).checkpoint_hash  # the same weights
    with pytest.raises(CheckpointError, match="not in this worker's hub cache"):
        resolve_model_uri("hf://acme/missing", cache_dir)


@pytest.mark.parametrize("uri, words", [("gs://b/m", "scheme must be one of"), ("hf://justname", "hf://org/name"),
                                        ("s3://bucket-only", "s3://bucket/prefix/"), ("http://x/y", "scheme")])
def test_unsupported_model_uris_are_refused_at_the_form(uri, words):
    from quantpipe.form import conf_problem

    problem = conf_problem({"model_uri": uri})
    assert problem and words in problem, problem


def test_s3_model_needs_the_remote_store(cache_dir):
    from quantpipe.store import Store

    with pytest.raises(CheckpointError, match="no S3 artifact store configured"):
        resolve_model_uri("s3://bucket/models/x/", cache_dir, Store.local())
