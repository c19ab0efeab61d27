"""What the use-case commands share: load a model with its tokenizer, ask it one chat turn, and
read a user's text file with one clear error when it is not text.

Every use case is one user turn in the Llama 4 chat format (herd/chat.py) answered greedily by
herd's engine (herd.generate: prepared model, KV cache, chunked prefill). The model may be any
herd run directory or Hugging Face Llama 4 directory with a tokenizer; `context` is the number of
tokens a prompt plus its answer may take (default: the model's max_position_embeddings, at most
DEFAULT_CONTEXT, so a 10M-token config does not ask for a 10M-token cache on a laptop).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONTEXT = 8192
SNIFF_BYTES = 8192


@dataclass
class Assistant:
    """A loaded model + tokenizer and the budget its prompts must fit in."""

    model: object
    tokenizer: object
    context: int
    max_new_tokens: int = 256

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt may take and still leave room for the answer."""
        return self.context - self.max_new_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False))

    def encode(self, text: str, images: list | None = None, system: str | None = None):
        """One user turn (images first, then the text) → (ids, pixel_values [n_tiles, 3, S, S] or None)."""
        import torch

        from herd.chat import encode_messages

        content = [{"type": "image", "image": im} for im in images or []] + [{"type": "text", "text": text}]
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        ids, tiles = encode_messages(self.tokenizer, msgs, vision_config=self.model.config.vision)
        return ids, (torch.cat(tiles) if tiles else None)

    def overhead(self, system: str | None = None) -> int:
        """Tokens the chat format adds around an empty user message."""
        return len(self.encode("", system=system)[0])

    def ask(self, text: str, images: list | None = None, system: str | None = None) -> str:
        """Greedy answer to one user turn."""
        from herd.inference.generate import generate

        ids, pixels = self.encode(text, images, system)
        if len(ids) > self.prompt_budget:
            raise ValueError(f"the prompt takes {len(ids)} tokens; the context of {self.context} leaves "
                             f"{self.prompt_budget} for it after {self.max_new_tokens} answer tokens")
        stops = set(self.model.config.text.eos_token_ids) | set(self.tokenizer.stop_tokens)
        out = generate(self.model, [ids], max_new_tokens=self.max_new_tokens, pixel_values=pixels,
                       tokenizer=self.tokenizer, stop_token_ids=sorted(stops), return_details=True,
                       max_seq_len=self.context)[0]
        return out.text.strip()


def load_assistant(model: str, tokenizer: str | None = None, dtype: str = "bfloat16", context: int | None = None,
                   max_new_tokens: int = 256) -> Assistant:
    from herd.inference.loading import load_for_inference, require_tokenizer

    if not (Path(model).is_dir() or "/" not in model):
        raise FileNotFoundError(f"model directory not found: {model}")
    m, tok = load_for_inference(model, dtype=dtype, tokenizer=tokenizer)
    tok = require_tokenizer(tok, model)
    limit = min(int(m.config.text.max_position_embeddings), DEFAULT_CONTEXT)
    ctx = int(context or limit)
    if ctx <= max_new_tokens:
        raise ValueError(f"--context {ctx} must be larger than --max-new-tokens {max_new_tokens}")
    return Assistant(m, tok, ctx, max_new_tokens)


def is_binary(data: bytes) -> bool:
    """A file is binary when its first bytes hold a NUL or are not UTF-8 (git's and grep's test)."""
    head = data[:SNIFF_BYTES]
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 3  # a character cut at the sniff boundary is still text
    return False


def read_text(path: str | Path, what: str = "document") -> str:
    """The UTF-8 text of a user's file; ValueError naming the file when it is missing, a folder,
    binary or empty."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a {what} file")
    data = p.read_bytes()
    if is_binary(data):
        raise ValueError(f"{p} is a binary file, not a text {what}")
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{p} is empty")
    return text


def add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="herd run directory or Hugging Face Llama 4 directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory's own)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    p.add_argument("--context", type=int, help=f"tokens a prompt + answer may take (default: the model's, at most "
                   f"{DEFAULT_CONTEXT})")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def assistant_from_args(args) -> Assistant:
    return load_assistant(args.model, args.tokenizer, args.dtype, args.context, args.max_new_tokens)
