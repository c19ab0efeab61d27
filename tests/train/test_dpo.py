"""DPO: the loss, rewards and gradients against TRL's DPOTrainer on the same weights and tokens,
IPO, the reference cache's keys, bad pairs, and a short run (TRL's metric names, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import herd
from herd.train.dpo import (BadLines, DPOConfig, DPOLoss, Pair, cache_key, collate, completion_logps, dpo,
                            load_pairs, preference_loss)
from tests.train.conftest import chat_model_dir

PAIRS = [
    {"prompt": "What is 3 + 4?", "chosen": "It is 7.", "rejected": "It is 9, I think."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
    {"chosen": [{"role": "user", "content": "Which digit?"}, {"role": "assistant", "content": "A seven."}],
     "rejected": [{"role": "user", "content": "Which digit?"}, {"role": "assistant", "content": "A cat."}]},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "def add(a, b): return a + b"},
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A text-only model (TRL loads it as transformers' Llama4ForCausalLM)."""
    return chat_model_dir(tmp_path_factory.mktemp("dpo_model"), vision=False)


def test_preference_loss_is_the_paper_formula():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    losses, cr, rj = preference_loss(pc, pr, rc, rr, beta=0.1)
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(losses, torch.log1p(torch.exp(-0.1 * h)))
    assert torch.allclose(cr, 0.1 * (pc - rc)) and torch.allclose(rj, 0.1 * (pr - rr))
    n = torch.tensor([2.0, 4.0])
    ipo, _, _ = preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", chosen_tokens=n, rejected_tokens=n)
    assert torch.allclose(ipo, ((pc - rc) / n - (pr - rr) / n - 5.0) ** 2)


@pytest.mark.parametrize("loss_type,sft_coef", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.2)])
def test_loss_rewards_and_gradients_equal_trl_dpo_trainer(text_model, tmp_path, loss_type, sft_coef):
    """herd's DPO objective on herd's model vs TRL's DPOTrainer._compute_loss on transformers'
    Llama4ForCausalLM loaded from the same directory, on the batch TRL's collator builds. With
    sft_coef α (RPO) TRL runs loss_type=[loss_type, "sft"], loss_weights=[1, α]; the chosen
    completions differ in length, so a mean of per-pair means would not match."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast

    model_dir, tok = text_model
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), pad_token="<|finetune_right_pad|>",
                                     eos_token="<|eot|>")
    hf = Llama4ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    # TRL's fused LM head reaches the backbone through `model.base_model`, which transformers'
    # Llama4ForCausalLM does not resolve (base_model_prefix "language_model", backbone at .model):
    # point the name at the backbone without registering a second module.
    object.__setattr__(hf, "language_model", hf.model)
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"It is {i + 1}." + " Sure." * i,
             "rejected": f"Maybe {i + 5}, or a cat."} for i in range(3)]
    rpo = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_coef]) if sft_coef else dict(loss_type=[loss_type])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, **rpo, report_to=[],
                         per_device_train_batch_size=3, use_cpu=True, bf16=False, precompute_ref_log_probs=False,
                         router_aux_loss_coef=0.0)  # no router auxiliary loss: herd's DPO objective has none
    trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_list(rows), processing_class=hf_tok)
    if trainer.ref_model is not None:  # TRL's own copy of the starting model
        object.__setattr__(trainer.ref_model, "language_model", trainer.ref_model.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    # move the policy away from the reference (the same noise on both sides), so that log-ratios,
    # rewards and the loss are not at their trivial starting values
    gen = torch.Generator().manual_seed(0)
    noise = {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in sorted(hf.named_parameters())}
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(noise[n])
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    trl_loss.backward()
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = herd.load_model(model_dir)
    model.train()
    b = len(rows)
    with torch.no_grad():  # the reference: the same starting weights
        ref_sums, _ = completion_logps(model(batch["input_ids"]), batch["input_ids"], batch["completion_mask"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(noise[n.removeprefix("language_model.")])
    hb = collate([Pair(str(i), [], [], [], [], [], []) for i in range(b)], 0)  # shape holder, replaced below
    hb.input_ids, hb.completion_mask = batch["input_ids"], batch["completion_mask"]
    hb.ref_chosen, hb.ref_rejected = ref_sums[:b], ref_sums[b:]
    loss_sum, n, metrics = DPOLoss(torch.device("cpu"), 0.1, loss_type, sft_coef)(model, hb)
    loss = loss_sum / n
    loss.backward()
    assert abs(m["rewards/margins"]) > 1e-3 and abs(float(loss) - 0.6931) > 1e-3  # not the trivial point
    assert len(set(batch["completion_mask"][:b].sum(1).tolist())) == b  # chosen lengths differ (see docstring)
    assert abs(float(loss) - float(trl_loss)) < 1e-5, (float(loss), float(trl_loss))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert abs(metrics[name] / n - m[name]) < 1e-5 * max(1.0, abs(m[name])), (name, metrics[name] / n, m[name])
    hf_params = dict(hf.named_parameters())
    herd_params = dict(model.named_parameters())
    checked = 0
    for name, p in herd_params.items():
        q = hf_params.get(name.removeprefix("language_model."))
        if q is None or p.grad is None or q.grad is None or q.grad.shape != p.grad.shape:
            continue
        scale = float(q.grad.abs().max()) + 1e-12
        assert float((p.grad - q.grad).abs().max()) < 1e-4 * scale + 1e-7, name
        checked += 1
    assert checked > 10


def test_reference_cache_key_changes_with_data_and_model(text_model, tmp_path):
    model_dir, _ = text_model
    data = _write(tmp_path / "p.jsonl", PAIRS)
    k0 = cache_key(data, model_dir, {"max_len": 256})
    assert cache_key(data, model_dir, {"max_len": 256}) == k0
    _write(tmp_path / "p.jsonl", PAIRS[:3])
    k1 = cache_key(data, model_dir, {"max_len": 256})
    other, _ = chat_model_dir(tmp_path / "other", vision=False, seed=1)
    k2 = cache_key(data, other, {"max_len": 256})
    assert len({k0, k1, k2, cache_key(data, model_dir, {"max_len": 128})}) == 4


@pytest.mark.parametrize("line, problem", [
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "'chosen' is identical to 'rejected'"),
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing field 'prompt'"),
    ({"prompt": [{"role": "wizard", "content": "a"}], "chosen": "b", "rejected": "c"}, "unknown role 'wizard'"),
    ({"prompt": "word " * 300, "chosen": "b", "rejected": "c"}, "longer than"),
])
def test_bad_pairs_name_file_line_and_problem(text_model, tmp_path, line, problem):
    model_dir, tok = text_model
    path = _write(tmp_path / "pairs.jsonl", [PAIRS[0], line])
    with pytest.raises(ValueError, match=f"pairs.jsonl:2: .*{problem}"):
        load_pairs(path, tok, None, 256, BadLines(False))
    bad = BadLines(True)
    assert len(load_pairs(path, tok, None, 256, bad)) == 1 and len(bad.messages) == 1


def test_pairs_in_every_trl_format_score_only_the_completion(text_model, tmp_path):
    model_dir, tok = text_model
    pairs = load_pairs(_write(tmp_path / "p.jsonl", PAIRS), tok, None, 256, BadLines(False))
    assert len(pairs) == 4
    for p in pairs:
        n = len(p.prompt)
        assert p.chosen[:n] == p.prompt and p.rejected[:n] == p.prompt
        assert not any(p.chosen_mask[:n]) and all(p.chosen_mask[n:])
        assert p.chosen[-1] == tok.special_tokens["<|eot|>"]
    assert tok.decode([t for t, m in zip(pairs[2].chosen, pairs[2].chosen_mask) if m]) == "A seven.<|eot|>"


def test_dpo_run_logs_trl_metrics_reuses_cache_and_resumes(text_model, tmp_path):
    model_dir, _ = text_model
    data = _write(tmp_path / "p.jsonl", PAIRS * 2)
    base = dict(init=str(model_dir), data=str(data), val_data=str(data), max_steps=4, batch_size=2, log_every=1,
                eval_every=2, ckpt_every=2, warmup=1, lr=1e-3, progress=False, bf16=False,
                ref_cache=str(tmp_path / "cache"))
    full = dpo(DPOConfig(out=str(tmp_path / "full"), **base))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert key in rows[0], key
    assert abs(rows[0]["loss"] - 0.69315) < 1e-3  # the policy starts as the reference: −log σ(0)
    assert "eval_rewards/accuracies" in rows[-1] and full["eval_loss"] < 0.69315
    dpo(DPOConfig(out=str(tmp_path / "part"), stop_after=2, **base))
    dpo(DPOConfig(out=str(tmp_path / "part"), resume=True, **base))
    again = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in again]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # computed once, reused by both runs


def test_on_policy_pairs_pair_a_verified_answer_with_a_wrong_one(text_model, tmp_path):
    from herd.train.dpo import build_pairs

    model_dir, tok = text_model
    rows = [{"id": f"q{i}", "task": "sum", "messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                         {"role": "assistant", "content": str(i + 1)}],
             "answer": str(i + 1), "verifier": "exact"} for i in range(3)]
    data = _write(tmp_path / "sft.jsonl", rows + [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}])
    counts = build_pairs(model_dir, data, tmp_path / "out", k=2, max_new=3, use_reference=True, progress=False)
    assert counts["prompts"] == 3  # only verifiable rows are sampled
    pairs = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == counts["pairs"] > 0
    from herd.data.chat_data import verify

    for p in pairs:
        row = next(r for r in rows if r["id"] == p["id"])
        assert verify(row, p["chosen"][0]["content"]) == 1.0 and verify(row, p["rejected"][0]["content"]) == 0.0
    assert len(load_pairs(tmp_path / "out" / "pairs.jsonl", tok, None, 256, BadLines(False))) == len(pairs)


def test_head_on_completion_tokens_only_equals_full_logits():
    """completion_logps_from_hidden (the LM head on completion positions only) = completion_logps on
    the full [N, T, V] logits, values and gradients."""
    from herd.train.dpo import completion_logps_from_hidden

    g = torch.Generator().manual_seed(0)
    N, T, H, V = 4, 9, 16, 50
    h = torch.randn(N, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, 2:6] = 1
    mask[3, 8:] = 1  # row 2: no completion tokens
    ref_sums, ref_n = completion_logps(h @ w.T, ids, mask)
    sums, n = completion_logps_from_hidden(h, w, ids, mask)
    assert torch.equal(n, ref_n) and sums[2] == 0
    torch.testing.assert_close(sums.double(), ref_sums.double(), rtol=1e-6, atol=1e-6)
    gh_ref, gw_ref = torch.autograd.grad((ref_sums * torch.arange(1.0, N + 1, dtype=ref_sums.dtype)).sum(), (h, w))
    gh, gw = torch.autograd.grad((sums * torch.arange(1.0, N + 1, dtype=sums.dtype)).sum(), (h, w))
    torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-6)


def test_negative_sft_coef_is_refused():
    with pytest.raises(ValueError, match="--sft-coef must be >= 0"):
        DPOConfig(init="runs/sft", data="pairs.jsonl", sft_coef=-0.1).validate()
