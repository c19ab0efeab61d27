"""herd's lm-evaluation-harness adapter against lm-eval's own Hugging Face backend.

The oracle is lm-eval's HFLM on the transformers model of the same directory (herd writes it,
transformers reads it), fed the same Instances. Log-likelihoods agree to 1e-4 and the greedy flags
match, for contexts with trailing spaces, an empty context, continuations of several tokens, and
rolling log-likelihoods cut into several windows; an adapter off by one position fails this (the
test shows it on a deliberately shifted copy). Generation is compared with transformers' greedy
decoding through HFLM.generate_until.
"""

from __future__ import annotations

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # dev dependency (pyproject `dev` extra)

from lm_eval.api.instance import Instance  # noqa: E402

CORPUS = ["The quick brown fox jumps over the lazy dog. def main(): return 0\n" * 40,
          "Hello world, how are you today? import os, sys; class Config: pass\n" * 40]

PAIRS = [("The quick brown", " fox jumps"), ("Hello world, how are ", "you today?"), ("", "The quick"),
         ("import os", ", sys; class Config: pass"), ("The lazy dog.", " Hello")]
DOCS = ["The quick brown fox jumps over the lazy dog. " * 6 + "Hello world, how are you today?", "import os"]
MAX_LEN = 24  # forces several rolling windows and left-truncated contexts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random text model (vocab 512) with a tokenizer trained on CORPUS (test_lm_eval_serve reuses it)."""
    from tests.conftest import random_model_dir

    return random_model_dir(tmp_path_factory.mktemp("lm_eval_model"), CORPUS, 512, seed=3)


@pytest.fixture(scope="module")
def both(model_dir):
    from lm_eval.models.huggingface import HFLM

    from herd.evals.lm_eval_adapter import HerdLM

    herd_lm = HerdLM(pretrained=str(model_dir), dtype="float32", batch_size=3, max_length=MAX_LEN)
    hf_lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=3, max_length=MAX_LEN, device="cpu",
                 add_bos_token=True, backend="causal")
    return herd_lm, hf_lm


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_lm_evals_hf_backend(both):
    herd_lm, hf_lm = both
    ours = herd_lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    theirs = hf_lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert all(s < 0 for s, _ in ours) and len({round(s, 3) for s, _ in ours}) == len(PAIRS)


def test_loglikelihood_rolling_equals_lm_evals_hf_backend(both, model_dir):
    """HFLM with add_bos_token=True puts BOS into the rolling token list and so also scores
    P(BOS | BOS); herd scores only the string's tokens, which is HFLM with add_bos_token=False
    (its windows are conditioned on BOS as the prefix token either way)."""
    from lm_eval.models.huggingface import HFLM

    herd_lm, _ = both
    hf_lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=3, max_length=MAX_LEN, device="cpu",
                 add_bos_token=False, backend="causal")
    docs = [(d,) for d in DOCS]
    assert len(herd_lm.tok_encode(DOCS[0], add_special_tokens=False)) > 2 * MAX_LEN  # several windows
    ours = herd_lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True)
    theirs = hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_an_adapter_off_by_one_position_is_caught(both, monkeypatch):
    """The same comparison fails when the scored logits are shifted by one position."""
    herd_lm, hf_lm = both
    real = herd_lm.model

    class Shifted(torch.nn.Module):
        config = real.config

        def forward(self, x):
            logits = real(x)
            return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # logits at t now predict token t

    monkeypatch.setattr(herd_lm, "model", Shifted())
    ours = herd_lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    theirs = hf_lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs)) > 1e-2


def test_generate_until_equals_transformers_greedy(both):
    herd_lm, hf_lm = both
    args = [("The quick brown", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
            ("Hello world,", {"until": ["zzz"], "max_gen_toks": 5})]
    ours = herd_lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    theirs = hf_lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert ours == theirs and all(isinstance(t, str) for t in ours)


def test_empty_context_is_conditioned_on_bos(both):
    herd_lm, _ = both
    (score, _), = herd_lm.loglikelihood(requests("loglikelihood", [("", " fox")]), disable_tqdm=True)
    ids = herd_lm.tok_encode(" fox", add_special_tokens=False)
    x = torch.tensor([[herd_lm.bos, *ids[:-1]]])
    logp = torch.log_softmax(herd_lm.model(x).double(), -1)[0]
    want = sum(logp[i, t].item() for i, t in enumerate(ids))
    assert math.isclose(score, want, abs_tol=1e-4)
