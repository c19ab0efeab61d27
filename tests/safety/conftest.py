"""Safety test fixtures: a small trained tokenizer, a guard4-shaped random model, a scripted model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from herd.safety.llama_guard import render_text

VOCAB = 512


@pytest.fixture(scope="session")
def guard_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE (Llama 4 specials at the top) trained on guard prompts."""
    from herd.tokenizer_train import train_tokenizer

    text = render_text([{"role": "user", "content": "How do I bake bread?"},
                        {"role": "assistant", "content": "Mix flour, water and yeast."}])
    corpus = [text, "safe\nunsafe\nS1,S2,S3,S4,S5,S6,S7,S8,S9,S10,S11,S12,S13,S14"] * 20
    out = tmp_path_factory.mktemp("guard_tok")
    return train_tokenizer(corpus, VOCAB, out)


class ScriptedModel(torch.nn.Module):
    """Stands in for a Llama 4: the logits at the last position put `margin` on the next token of
    `script` (then on <|eot|>), so a guard's decoding and scoring can be tested exactly."""

    def __init__(self, script: list[int], eot: int, vocab: int = VOCAB, margin: float = 10.0):
        super().__init__()
        self.script, self.eot, self.vocab, self.margin = script, eot, vocab, margin
        self.prompt_len = self.last = None
        self.config = SimpleNamespace(text=SimpleNamespace(max_position_embeddings=4096), vision=None)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    device = property(lambda self: self.dummy.device)
    dtype = property(lambda self: self.dummy.dtype)

    def forward(self, ids, pixel_values=None):
        if self.prompt_len is None or ids.shape[1] != self.last + 1:  # a new prompt (not one more token)
            self.prompt_len = ids.shape[1]
        self.last = ids.shape[1]
        k = ids.shape[1] - self.prompt_len
        nxt = self.script[k] if k < len(self.script) else self.eot
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[:, -1, nxt] = self.margin
        return logits


@pytest.fixture
def scripted(guard_tokenizer):
    def make(output: str, margin: float = 10.0):
        tok = guard_tokenizer
        return ScriptedModel(tok.encode(output), tok.special_tokens["<|eot|>"], margin=margin)
    return make


@pytest.fixture
def toy_guard_examples(monkeypatch):
    """12 one-line prompts (odd: "bomb N" → unsafe S9, even: "bread N" → safe), 8 train / 4 test,
    served by train_llama_guard.build_examples in place of the bundled safety data."""
    from herd.safety import train_llama_guard as tlg

    toy = [{"id": f"t{i}", "source": "toy", "kind": "prompt",
            "messages": [{"role": "user", "content": ("bomb " if i % 2 else "bread ") + str(i)}],
            "code": "S9" if i % 2 else None} for i in range(12)]
    for e in toy:
        e["target"] = "safe" if e["code"] is None else f"unsafe\n{e['code']}"
    monkeypatch.setattr(tlg, "build_examples", lambda n, seed=0: {"train": toy[:8], "test": toy[8:]})
    return toy
