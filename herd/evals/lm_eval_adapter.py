"""lm-evaluation-harness on herd models: `--model herd --model_args pretrained=DIR`.

    python -m herd.evals.lm_eval_adapter --model herd --model_args pretrained=runs/sft \\
        --tasks herd_cloze_shakespeare,herd_arith --output_path runs/sft/lm_eval
    # the same flags as `lm_eval`; herd's offline tasks (herd/evals/tasks/) are on the include path

    import herd.evals.lm_eval_adapter, lm_eval        # importing the module registers "herd"
    lm_eval.simple_evaluate(model="herd", model_args="pretrained=runs/sft", tasks=[...],
                            task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR))

lm-eval (0.4.x) has no plugin entry point for models, so `herd` is registered when this module is
imported; `python -m herd.evals.lm_eval_adapter` is lm-eval's own CLI after that import. herd
imports lm_eval nowhere else, and only this module needs it installed (`pip install lm-eval`).

One class, HerdLM, over lm-eval's TemplateLM: lm-eval itself splits (context, continuation) into
tokens (trailing context spaces move to the continuation; the whole string is encoded and cut at
the context's length), so the only scoring code here is `_loglikelihood_tokens`, the place where
custom adapters usually go wrong by one position. For a request with context tokens c and
continuation tokens x (|x| = n), the input is (c + x)[:-1], at most max_length tokens from the
right, and the score is Σ_i log softmax(logits[len(input) - n + i])[x_i]: the logits at position
t predict token t + 1. is_greedy: every x_i is the argmax at its position. Requests run in
batches of similar length, right-padded (causal attention: padding after a row cannot change it).

generate_until goes through herd's Engine (herd.generate: continuous batching, KV cache), greedy
unless the task asks to sample, stopped by the task's `until` strings and the model's EOS ids;
the text skips special tokens, as the HF backend's decode does.

Tokens: herd's tokenizer of the model directory, BOS prepended to every context as Llama
tokenizers do by default (add_bos_token=False turns it off); an empty context is BOS alone.
loglikelihood_rolling scores the string's own tokens after a BOS prefix. (lm-eval's HF backend
with a BOS-adding tokenizer also scores P(BOS | BOS) as the first token of every document, a
constant offset that herd leaves out; with add_bos_token=False the two agree.)
Parity tests (tests/evals/test_lm_eval_adapter.py): the same requests through lm-eval's HF
backend on the transformers model of the same directory agree to 1e-4, and so do lm-eval's
`local-completions` answers from `herd serve` (echo + logprobs; tests/evals/test_lm_eval_serve.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

TASKS_DIR = str(Path(__file__).with_name("tasks"))


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("herd")
class HerdLM(TemplateLM):
    """lm-eval model: loglikelihood, loglikelihood_rolling and generate_until on a herd model."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str = "float32", batch_size=8,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token=True, **_ignored):
        super().__init__()
        from herd.inference.loading import find_tokenizer, load_model, parse_dtype, require_tokenizer

        self.model = load_model(str(pretrained), dtype=parse_dtype(dtype)).eval()
        self.tok = require_tokenizer(find_tokenizer(str(pretrained), self.model, tokenizer), str(pretrained))
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        text = self.model.config.text
        self._max_length = int(max_length or min(text.max_position_embeddings, 8192))
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = _bool(add_bos_token)
        self.bos = self.tok.special_tokens["<|begin_of_text|>"]
        self.stop_ids = sorted(set(text.eos_token_ids) | set(self.tok.stop_tokens))
        self._specials = set(self.tok.special_tokens.values())

    # ----- what TemplateLM asks for ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.stop_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self.bos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # ----- scoring -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_ids, continuation_ids)] → [(log p, is_greedy)]."""
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("lm-eval sent an empty continuation to score")
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # the last token is only predicted
            rows.append((i, inp, cont))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch; longest first shows OOM early
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for a in tqdm(range(0, len(rows), self.batch_size), desc="herd loglikelihood", disable=disable_tqdm):
            batch = rows[a:a + self.batch_size]
            width = len(batch[0][1])
            x = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded
            for b, (_, inp, _) in enumerate(batch):
                x[b, :len(inp)] = torch.tensor(inp)
            logp = torch.log_softmax(self.model(x).float(), dim=-1)  # [B, T, vocab]
            for b, (i, inp, cont) in enumerate(batch):
                n = len(cont)
                lp = logp[b, len(inp) - n:len(inp)]  # [n, vocab]: position t predicts token t + 1
                target = torch.tensor(cont)
                score = lp.gather(1, target[:, None])[:, 0].sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole string, in disjoint windows of max_length predicted tokens, the
        first conditioned on BOS (lm-eval's get_rolling_token_windows, as its HF backend does)."""
        results = []
        for req in tqdm(requests, desc="herd loglikelihood_rolling", disable=disable_tqdm):
            (string,) = req.args
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, x) for c, x in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    # ----- generation --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from herd.inference.generate import generate

        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for a in tqdm(range(0, len(order), self.batch_size), desc="herd generate_until", disable=disable_tqdm):
            idx = order[a:a + self.batch_size]
            groups: dict[tuple, list[int]] = {}
            for i in idx:  # one generate call per distinct set of sampling settings
                kw = dict(requests[i].args[1] or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                sample = _bool(kw.get("do_sample", False))
                temp = float(kw.get("temperature", 0.0)) if sample else 0.0
                max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
                groups.setdefault((tuple(until), temp, max_new), []).append(i)
            for (until, temp, max_new), members in groups.items():
                prompts = []
                for i in members:
                    ids = self.tok_encode(requests[i].args[0])
                    prompts.append(ids[-(self.max_length - max_new):])
                outs = generate(self.model, prompts, max_new_tokens=max_new, temperature=temp, seed=0,
                                tokenizer=self.tok, stop=list(until), stop_token_ids=self.stop_ids,
                                return_details=True, max_seq_len=self.max_length)
                for i, g in zip(members, outs):
                    # as lm-eval's HF backend: special tokens skipped, text cut at the first stop string
                    text = self.tok.decode([t for t in g.tokens if t not in self._specials])
                    for term in until:
                        text = text.split(term)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `herd` registered and herd's task folder on the include path."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and any(a in ("--tasks", "-t") for a in argv):
        argv += ["--include_path", TASKS_DIR]
    if argv and argv[0] not in ("run", "ls", "validate", "-h", "--help"):
        argv = ["run", *argv]  # lm-eval ≥0.4.10 takes subcommands; plain flags mean `run`
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
