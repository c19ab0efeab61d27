"""`herd guard train-llama --from-base`: the tiny Llama Guard started, as Llama Guard 4 was, from a
pre-trained MoE pruned to its shared experts (herd.model.prune), with the base's tokenizer."""

from __future__ import annotations

import pytest
import torch

from herd.model.llama4 import build_model
from herd.model.moe import MoE
from herd.model.weights import load_model, save_model
from herd.presets import get_config
from herd.safety import train_llama_guard as tlg


@pytest.fixture()
def moe_base(tmp_path, guard_tokenizer):
    """A tiny multimodal MoE base directory (random weights) with the 512-token guard tokenizer."""
    cfg = get_config("tiny")
    t = cfg.text
    t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = 512, 64, 2, 2, 1
    t.head_dim, t.intermediate_size, t.intermediate_size_mlp, t.num_local_experts = 32, 32, 64, 4
    t.no_rope_layers = [1, 0]
    t.attention_chunk_size = 32  # shorter than a guard prompt, as the speedrun base's 256 chunks are
    base = 512 - 128
    t.bos_token_id, t.eos_token_id = base, [base + 1, base + 7, base + 8]
    cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index = base + 16, base + 17, base + 28
    cfg.vision.vision_output_dim = cfg.vision.projector_input_dim = cfg.vision.projector_output_dim = 64
    model = build_model(cfg, seed=0)
    d = tmp_path / "base"
    save_model(model, d)
    guard_tokenizer.save(d)
    return d


def test_from_base_starts_from_the_pruned_base_and_keeps_its_tokenizer(tmp_path, moe_base, toy_guard_examples):
    cfg = tlg.GuardTrainConfig(out=str(tmp_path / "g"), max_steps=1, batch_size=4, warmup=1, eval_every=1,
                               ckpt_every=1, log_every=1, progress=False, bf16=False, lr=0.0, weight_decay=0.0,
                               from_base=str(moe_base))
    summary = tlg.train(cfg)
    assert summary["eval"]["n"] == 4
    out = tmp_path / "g"
    assert (out / "tokenizer.json").read_text() == (moe_base / "tokenizer.json").read_text()
    assert not (out / "tokenizer").exists()  # no tokenizer trained
    guard = load_model(out, dtype=torch.float32)
    base = load_model(moe_base, dtype=torch.float32)
    t = guard.config.text
    assert guard.vision_model is None and t.moe_layers == [] and t.intermediate_size_mlp == 32
    assert not any(isinstance(m, MoE) for m in guard.modules())
    assert t.no_rope_layers == [1, 0] and t.attention_chunk_size is None  # global, as Llama Guard 4's config
    # lr 0: the saved guard is exactly the pruned base: the shared experts are its MLPs
    for g_layer, b_layer in zip(guard.layers, base.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(getattr(g_layer.feed_forward, name).weight,
                                       getattr(b_layer.feed_forward.shared_expert, name).weight)
        torch.testing.assert_close(g_layer.self_attn.q_proj.weight, b_layer.self_attn.q_proj.weight)
    torch.testing.assert_close(guard.language_model.lm_head.weight, base.language_model.lm_head.weight)


def test_global_attention_keeps_the_first_chunk_and_lets_the_verdict_see_past_it(moe_base):
    base = load_model(moe_base, dtype=torch.float32)
    chunk = base.config.text.attention_chunk_size
    assert chunk == 32
    kept, wide = tlg.pruned_base(moe_base, global_attention=False), tlg.pruned_base(moe_base)
    assert kept.config.text.attention_chunk_size == chunk and wide.config.text.attention_chunk_size is None
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 384, (1, chunk + 40), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(wide(x[:, :chunk]), kept(x[:, :chunk]))  # same function inside one chunk
        y = x.clone()
        y[0, chunk - 20] = (x[0, chunk - 20] + 1) % 384  # change a token in the first chunk
        # the last position (second chunk) sees it on every layer when global, only on the NoPE layer when chunked
        d_wide = (wide(y)[0, -1] - wide(x)[0, -1]).abs().max()
        assert d_wide > 1e-4
    # chunked: the change reaches the last position only through the NoPE (global) layer; with that
    # layer's attention output zeroed, nothing reaches it
    for m in (kept, wide):
        m.layers[1].self_attn.o_proj.weight.data.zero_()
    with torch.no_grad():
        assert (kept(y)[0, -1] - kept(x)[0, -1]).abs().max() == 0
        assert (wide(y)[0, -1] - wide(x)[0, -1]).abs().max() > 1e-4


def test_head_only_steps_train_the_head_and_leave_the_body_as_the_base(tmp_path, moe_base, toy_guard_examples):
    from herd.model.weights import load_model as load

    cfg = tlg.GuardTrainConfig(out=str(tmp_path / "g"), max_steps=3, head_only_steps=2, batch_size=4, warmup=1,
                               eval_every=3, ckpt_every=1, log_every=1, progress=False, bf16=False, lr=1e-2,
                               from_base=str(moe_base), eval_limit=1)
    tlg.train(cfg)
    start = tlg.pruned_base(moe_base)
    at2 = load(tmp_path / "g" / "checkpoints" / "step_000002", dtype=torch.float32)
    final = load(tmp_path / "g", dtype=torch.float32)
    s0, s2, s3 = start.state_dict(), at2.state_dict(), final.state_dict()
    head = "language_model.lm_head.weight"
    assert not torch.equal(s2[head], s0[head])  # the head learned in the head-only steps
    for k in s0:
        if k != head:
            torch.testing.assert_close(s2[k], s0[k], rtol=0, atol=0)  # the body did not move
    assert any(not torch.equal(s3[k], s0[k]) for k in s0 if k != head)  # step 3 trains everything
    with pytest.raises(ValueError, match="--head-only-steps"):
        tlg.train(tlg.GuardTrainConfig(out=str(tmp_path / "h"), max_steps=3, head_only_steps=3,
                                       from_base=str(moe_base)))


def test_from_base_bad_input_is_one_clear_error(tmp_path, moe_base):
    with pytest.raises(ValueError, match="--init and --from-base"):
        tlg.train(tlg.GuardTrainConfig(out=str(tmp_path / "g"), init=str(moe_base), from_base=str(moe_base)))
    with pytest.raises(ValueError, match="--from-base .*no config.json"):
        tlg.pruned_base(tmp_path / "nowhere")


def test_cli_passes_from_base(monkeypatch, tmp_path):
    import argparse

    from herd.safety import cli

    seen = {}
    monkeypatch.setattr(tlg, "train", lambda cfg: seen.setdefault("cfg", cfg) and {"eval": {"table": ""}})
    parser = argparse.ArgumentParser()
    cli.add_guard_subcommand(parser.add_subparsers())
    args = parser.parse_args(["guard", "train-llama", "--from-base", "runs/x", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert seen["cfg"].from_base == "runs/x" and seen["cfg"].lr == 1e-3 and seen["cfg"].global_attention
    seen.clear()
    args = parser.parse_args(["guard", "train-llama", "--from-base", "runs/x", "--keep-chunks", "--out", str(tmp_path)])
    assert args.func(args) == 0 and not seen["cfg"].global_attention
