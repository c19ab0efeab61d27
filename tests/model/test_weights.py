"""Weights in/out: Hugging Face layouts, sharding, memory-mapped loading, clear errors, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import herd
from herd.model.weights import read_safetensors, write_safetensors
from tests.conftest import load_transformers, model_config


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_multimodal_and_text_layouts(tmp_path):
    for vision in (True, False):
        cfg = model_config(vision=vision)
        m = herd.build_model(cfg, seed=3)
        d = tmp_path / str(vision)
        herd.save_model(m, d)
        keys = set(read_safetensors(d / "model.safetensors"))
        if vision:
            assert "language_model.model.embed_tokens.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
            assert json.loads((d / "config.json").read_text())["architectures"] == ["Llama4ForConditionalGeneration"]
        else:
            assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
            assert not any(k.startswith("language_model.") for k in keys)
        _same_params(m, herd.load_model(d))


def test_safetensors_writer_matches_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file(tensors, tmp_path / "lib.safetensors")
    ours = read_safetensors(tmp_path / "lib.safetensors")
    for k, v in tensors.items():
        assert torch.equal(theirs[k], v) and torch.equal(ours[k], v) and ours[k].dtype == v.dtype


def test_sharded_save_loads_in_herd_and_transformers(tmp_path):
    cfg = model_config(vision=True, text=dict(tie_word_embeddings=True))
    m = herd.build_model(cfg, seed=4).eval()
    herd.save_model(m, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert "language_model.lm_head.weight" not in index["weight_map"]  # tied: stored once
    again = herd.load_model(tmp_path)
    assert again.language_model.lm_head.weight is again.language_model.model.embed_tokens.weight
    _same_params(m, again)
    hf = load_transformers(tmp_path, True)
    ids = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        assert (hf.language_model(input_ids=ids).logits - m(ids)).abs().max() < 1e-4
    # re-saving unsharded removes the old shards only after the new file is in place
    herd.save_model(m, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_bf16_save_and_load_with_dtype_conversion(tmp_path):
    m = herd.build_model(model_config(vision=False), seed=5)
    herd.save_model(m, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert read_safetensors(tmp_path / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    loaded = herd.load_model(tmp_path, dtype=torch.float32)
    assert loaded.dtype == torch.float32
    w = m.language_model.lm_head.weight
    torch.testing.assert_close(loaded.language_model.lm_head.weight, w.bfloat16().float())


def test_mismatched_checkpoint_lists_every_problem_in_one_error(tmp_path):
    m = herd.build_model(model_config(vision=False), seed=6)
    herd.save_model(m, tmp_path)
    t = read_safetensors(tmp_path / "model.safetensors")
    t = {k: v.clone() for k, v in t.items()}
    del t["model.norm.weight"]
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    t["model.extra.weight"] = torch.zeros(1)
    write_safetensors(tmp_path / "model.safetensors", t)
    with pytest.raises(ValueError) as e:
        herd.load_model(tmp_path)
    msg = str(e.value)
    assert "missing (1): language_model.model.norm.weight" in msg
    assert "unexpected (1): language_model.model.extra.weight" in msg
    assert "wrong shape (1)" in msg and "q_proj" in msg


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path):
    m = herd.build_model(model_config(vision=False), seed=7)
    herd.save_model(m, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        herd.load_model(tmp_path)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        herd.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a preset"):
        herd.load_model(tmp_path / "nope")


def test_pickle_weights_are_refused_unless_opted_in(tmp_path):
    m = herd.build_model(model_config(vision=False), seed=8)
    herd.save_model(m, tmp_path)
    state = {k: v.clone() for k, v in read_safetensors(tmp_path / "model.safetensors").items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        herd.load_model(tmp_path)
    _same_params(m, herd.load_model(tmp_path, allow_pickle=True))


def test_loading_is_memory_mapped_peak_rss_under_1_3x(tmp_path):
    """Load a ~190 MB checkpoint in a fresh process and measure the peak RSS it adds."""
    cfg = model_config(vision=False, text=dict(vocab_size=48000, hidden_size=512, num_attention_heads=8,
                                               num_key_value_heads=2, head_dim=64, intermediate_size=512,
                                               num_local_experts=8))
    m = herd.build_model(cfg, seed=9, init=False)
    herd.save_model(m, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size > 150e6
    del m
    script = textwrap.dedent(f"""
        import torch, herd, herd.model.weights
        def kb(key):
            for line in open('/proc/self/status'):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        base = kb('VmRSS:')
        model = herd.load_model({str(tmp_path)!r})
        print(kb('VmHWM:') - base, sum(p.numel() * p.element_size() for p in model.parameters()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    added, nbytes = map(int, out.split())
    assert nbytes > 0.95 * size
    assert added < 1.3 * size, f"loading added {added / 1e6:.0f} MB of RSS for a {size / 1e6:.0f} MB checkpoint"


def test_interrupted_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    from herd.model import weights

    write_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(3)})

    class Boom(Exception):
        pass

    def failing_write(f):
        f.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        weights.atomic_write_bytes(tmp_path / "x.safetensors", failing_write)
    assert torch.equal(read_safetensors(tmp_path / "x.safetensors")["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left behind
