"""The same lm-eval loglikelihood requests three ways agree: herd's adapter in process, and
lm-eval's own `local-completions` model pointed at `herd serve` (OpenAI /v1/completions with
echo + logprobs, the route lm-eval takes for any served model)."""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from tests.evals.test_lm_eval_adapter import PAIRS, model_dir  # noqa: E402, F401 (model_dir is a fixture)
from tests.serve.conftest import live_server  # noqa: E402


def test_adapter_equals_local_completions_through_herd_serve(model_dir):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    import herd
    from herd.evals.lm_eval_adapter import HerdLM
    from herd.serve import Settings, create_app
    from herd.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    pairs = [p for p in PAIRS if p[0]]  # local-completions cannot score an empty context (ctxlen 0)
    reqs = lambda: [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i)  # noqa: E731
                    for i, a in enumerate(pairs)]
    ours = HerdLM(pretrained=str(model_dir), dtype="float32", batch_size=4).loglikelihood(reqs(), disable_tqdm=True)
    model = herd.load_model(model_dir)
    engine = herd.Engine(model, max_batch=4, max_seq_len=512, tokenizer=load_tokenizer(model_dir), prefill_chunk=64)
    app = create_app(Settings(model_name="tiny"), engine)
    with live_server(app) as url:
        api = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", tokenizer_backend="huggingface",
                                  tokenizer=str(model_dir), add_bos_token=True, num_concurrent=1, max_retries=1)
        theirs = api.loglikelihood(reqs(), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
