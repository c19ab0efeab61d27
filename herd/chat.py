"""Llama 4 chat format: OpenAI-style messages <-> token ids (+ image tiles).

    ids, tiles = encode_messages(tok, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                     {"type": "text", "text": "What is this?"}]},
    ])
    reply = decode_assistant(tok, generated_ids)   # {"role": "assistant", "content": ..., ...}

Layout (token ids identical to llama-models' ChatFormat.encode_dialog_prompt):

    <|begin_of_text|>
    <|header_start|>ROLE<|header_end|>\\n\\n CONTENT <|eot|>      (one per message)
    <|header_start|>assistant<|header_end|>\\n\\n                 (add_generation_prompt)

ROLE is system / user / assistant / ipython (tool results). A message ends with <|eom|>
when it is a tool result, or an assistant turn that calls tools or stopped at end of message.
An image becomes <|image_start|> [tiles] <|image|> <|patch|>*n <|image_end|>, where [tiles]
is, for a rows x cols grid, each row's tiles (<|patch|>*n each, <|tile_x_separator|>
between them) followed by <|tile_y_separator|>; the global tile follows <|image|>. A single
tile image has no [tiles]: <|image_start|><|image|><|patch|>*n<|image_end|>.

Special tokens are looked up by name, so trained tokenizers with other ids work too.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

import torch

from herd.image import TiledImage, VisionSettings, preprocess_image

ROLE_HEADERS = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")

_CUSTOM_CALL = re.compile(r"<function=(?P<name>[^}]+)>(?P<args>{.*?})")
_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')


def _special(tokenizer, name: str) -> int:
    try:
        return tokenizer.special_tokens[name]
    except KeyError:
        raise ValueError(f"the tokenizer has no special token {name}; the chat format needs it") from None


def _load(tokenizer):
    if isinstance(tokenizer, str):
        from herd.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------- encoding


def header_tokens(tokenizer, role: str) -> list[int]:
    """<|header_start|>ROLE<|header_end|>\\n\\n for a message role."""
    if role not in ROLE_HEADERS:
        raise ValueError(f"unknown role {role!r}: expected one of {sorted(ROLE_HEADERS)}")
    return [
        _special(tokenizer, "<|header_start|>"),
        *tokenizer.encode(ROLE_HEADERS[role]),
        _special(tokenizer, "<|header_end|>"),
        *tokenizer.encode("\n\n"),
    ]


def image_tokens(tokenizer, grid: tuple[int, int], tokens_per_tile: int) -> list[int]:
    """Placeholder tokens for one image whose local tiles form `grid` = (rows, cols)."""
    start, end = _special(tokenizer, "<|image_start|>"), _special(tokenizer, "<|image_end|>")
    patch, image = _special(tokenizer, "<|patch|>"), _special(tokenizer, "<|image|>")
    patches = [patch] * tokens_per_tile
    rows, cols = grid
    ids = [start]
    if rows * cols > 1:
        x_sep, y_sep = _special(tokenizer, "<|tile_x_separator|>"), _special(tokenizer, "<|tile_y_separator|>")
        for _ in range(rows):
            for col in range(cols):
                ids += patches
                if col < cols - 1:
                    ids.append(x_sep)
            ids.append(y_sep)
    return ids + [image] + patches + [end]


def _image_source(part: dict) -> Any:
    if part["type"] == "image":
        for key in ("image", "url", "path", "data"):
            if part.get(key) is not None:
                return part[key]
        raise ValueError("an image part needs an 'image' field (PIL image, path, bytes or data URL)")
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ValueError("an image_url part needs {'image_url': {'url': 'data:image/...;base64,...'}}")
    return url


def _content_parts(content) -> list:
    if content is None:
        return []
    if isinstance(content, (str, dict)):
        return [content]
    if isinstance(content, (list, tuple)):
        return list(content)
    raise ValueError(f"message content must be a str or a list of parts, got {type(content).__name__}")


def _arguments(raw) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call arguments are not valid JSON: {e}") from None
    return {} if raw is None else raw


def _python_literal(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a tool argument of type {type(value).__name__}")


def tool_call_text(call: dict, tool_prompt_format: str = "json") -> str:
    """How an assistant tool call is written in the prompt (as llama-models writes it).

    call: OpenAI {"function": {"name", "arguments"}} or {"name"/"tool_name", "arguments"}."""
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    name = fn.get("name") or fn.get("tool_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a function name, got {call!r}")
    args = _arguments(fn.get("arguments", fn.get("parameters")))
    if name in BUILTIN_TOOLS:
        key = "code" if name == "code_interpreter" else "query"
        if not isinstance(args, dict) or key not in args:
            raise ValueError(f"builtin tool {name} needs a {key!r} argument, got {args!r}")
        return args["code"] if key == "code" else f'{name}.call(query="{args["query"]}")'
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_prompt_format == "python_list":
        if not isinstance(args, dict):
            raise ValueError("python_list tool calls need keyword arguments (a dict)")
        return f"[{name}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items()) + ")]"
    raise ValueError(f"tool_prompt_format must be one of {TOOL_PROMPT_FORMATS}, got {tool_prompt_format!r}")


class _Encoder:
    def __init__(self, tokenizer, settings: VisionSettings, tool_prompt_format: str):
        if tool_prompt_format not in TOOL_PROMPT_FORMATS:
            raise ValueError(f"tool_prompt_format must be one of {TOOL_PROMPT_FORMATS}, got {tool_prompt_format!r}")
        self.tok = tokenizer
        self.settings = settings
        self.tool_prompt_format = tool_prompt_format
        self.ids: list[int] = []
        self.tiles: list[torch.Tensor] = []  # one [n_tiles, 3, T, T] per image

    def content(self, content) -> None:
        for part in _content_parts(content):
            if isinstance(part, str):
                self.ids += self.tok.encode(part)
                continue
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError(f"a content part must be a str or a dict with a 'type', got {part!r}")
            kind = part["type"]
            if kind in ("text", "input_text"):
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text part needs a str 'text' field")
                self.ids += self.tok.encode(part["text"])
            elif kind in ("image", "image_url", "input_image"):
                image: TiledImage = preprocess_image(_image_source(part), self.settings)
                self.ids += image_tokens(self.tok, image.grid, self.settings.tokens_per_tile)
                self.tiles.append(image.tiles)
            else:
                raise ValueError(f"unknown content part type {kind!r}: expected text, image or image_url")

    def message(self, message: dict) -> None:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"a message must be a dict with 'role' and 'content', got {message!r}")
        role = message["role"]
        self.ids += header_tokens(self.tok, role)
        self.content(message.get("content"))
        if role == "user" and message.get("context") is not None:  # retrieved context (llama-models' RAG field)
            self.content("\n\n")
            self.content(message["context"])
        calls = (message.get("tool_calls") or []) if role == "assistant" else []
        for call in calls:
            self.content(tool_call_text(call, self.tool_prompt_format))
        stop = str(message.get("stop_reason") or "")
        eom = role in ("tool", "ipython") or (role == "assistant" and (bool(calls) or stop in ("eom", "end_of_message")))
        self.ids.append(_special(self.tok, "<|eom|>" if eom else "<|eot|>"))


def encode_messages(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = True,
    vision_config=None,
    *,
    tool_prompt_format: str = "json",
    max_num_tiles: int | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Token ids of a dialog and the tiles of its images, in order of appearance.

    messages: [{"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": str | parts}],
      parts: {"type": "text", "text"}, {"type": "image", "image": PIL | path | bytes | data URL},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.
      Assistant messages may carry "tool_calls" (OpenAI form) and "stop_reason" ("eom").
    vision_config: duck-typed (image_size, patch_size, pixel_shuffle_ratio[, max_num_tiles]);
      None means the published Llama 4 settings (336-px tiles, 144 <|patch|> per tile).
    Returns (ids, tiles): tiles[i] is a float32 [n_tiles_i, 3, T, T] tensor.
    """
    tok = _load(tokenizer)
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    enc = _Encoder(tok, VisionSettings.from_config(vision_config, max_num_tiles), tool_prompt_format)
    enc.ids.append(_special(tok, "<|begin_of_text|>"))
    for message in messages:
        enc.message(message)
    if add_generation_prompt:
        enc.ids += header_tokens(tok, "assistant")
    return enc.ids, enc.tiles


# ----------------------------------------------------------------------------- decoding


def _python_calls(text: str) -> list[tuple[str, dict]] | None:
    """[(name, kwargs)] if `text` is a Python list of keyword-only calls, else None."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return None
    calls = []
    for node in tree.body[0].value.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        try:
            calls.append((node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}))
        except ValueError:
            return None
    return calls or None


def _custom_calls(text: str) -> list[tuple[str, Any]] | None:
    """Calls in the forms llama-models parses: <function=NAME>{json}, a JSON function object,
    or a Python list of calls."""
    match = _CUSTOM_CALL.search(text)
    if match:
        try:
            return [(match["name"], json.loads(match["args"].replace("'", '"')))]
        except json.JSONDecodeError:
            return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if (obj.get("type") == "function" or "name" in obj) and "name" in obj:
            return [(obj["name"], obj.get("parameters", obj.get("arguments", {})))]
        return None
    return _python_calls(text)


def _tool_calls(text: str, ipython: bool) -> list[tuple[str, Any]]:
    calls = _custom_calls(text)
    if calls is not None:
        # A builtin tool called in the custom form: its single argument is the query.
        return [(n, {"query": next(iter(a.values()), None)}) if n in BUILTIN_TOOLS and isinstance(a, dict) else (n, a)
                for n, a in calls]
    match = _BUILTIN_CALL.search(text)
    if match:
        return [(match["name"], {"query": match["query"]})]
    if ipython:
        return [("code_interpreter", {"code": text})]
    return []


def decode_assistant(tokenizer, token_ids) -> dict:
    """The assistant message in generated `token_ids` (as llama-models decodes it).

    Reads up to the first stop token: stop_reason is "eot" (<|eot|> or <|end_of_text|>),
    "eom" (<|eom|>, the model waits for a tool result) or "length" (no stop token).
    A leading assistant header is skipped. Tool calls are parsed from
    <|python_start|>...<|python_end|> (code), `tool.call(query="...")`,
    <function=NAME>{json}, a JSON function object or a Python list of calls; when there
    are tool calls, content is "".
    Returns {"role": "assistant", "content", "stop_reason", "tool_calls": [OpenAI-style]}.
    """
    tok = _load(tokenizer)
    ids = [int(i) for i in token_ids]
    stop_reason = "length"
    eom = tok.special_tokens.get("<|eom|>")
    for pos, i in enumerate(ids):
        if i in tok.stop_tokens:
            stop_reason = "eom" if i == eom else "eot"
            ids = ids[:pos]
            break
    header = header_tokens(tok, "assistant")
    had_header = ids[: len(header)] == header
    if had_header:
        ids = ids[len(header):]
    py_start, py_end = tok.special_tokens.get("<|python_start|>"), tok.special_tokens.get("<|python_end|>")
    ipython = bool(ids) and ids[0] == py_start
    if ipython:
        ids = [i for i in ids[1:] if i != py_end]
    text = tok.decode(ids)
    # llama-models strips spaces from the whole reply (header and stop token included).
    if not had_header and not ipython:
        text = text.lstrip(" ")
    if stop_reason == "length":
        text = text.rstrip(" ")
    calls = _tool_calls(text, ipython)
    tool_calls = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for name, args in calls
    ]
    return {
        "role": "assistant",
        "content": "" if tool_calls else text,
        "stop_reason": stop_reason,
        "tool_calls": tool_calls,
    }
