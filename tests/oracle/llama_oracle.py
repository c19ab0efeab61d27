"""Reference outputs from Meta's llama-models, computed inside the oracle venv (.venv-oracle).

Run by the tests as:  .venv-oracle/bin/python tests/oracle/llama_oracle.py SPEC.json OUT_DIR

SPEC.json (written by the tests, in herd's OpenAI-style message format):
  {"chat":   [{"messages": [...], "vision": {image_size, patch_size, pixel_shuffle_ratio,
               max_num_tiles} | null, "tool_prompt_format": "json"}],
   "decode": [{"tokens": [int, ...]}],
   "images": [{"path": "...png", "tile_size": 336, "max_num_tiles": 16}]}
OUT_DIR receives results.json ({"chat": [{"tokens"}], "decode": [{"content", "stop_reason",
"tool_calls"}]}), chat_<i>.npz (arrays image_0, image_1, ... for dialog i) and image_<i>.npz
(arrays tiles [n, 3, T, T], global [3, T, T], grid [rows, cols]).
This file only translates formats; all the work is llama-models' own code.
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, StopReason, ToolCall, ToolPromptFormat
from llama_models.llama4.args import Size, VisionArgs
from llama_models.llama4.chat_format import ChatFormat, convert_image_to_rgb
from llama_models.llama4.preprocess import ResizeNormalizeImageTransform, VariableSizeImageTransform
from llama_models.llama4.tokenizer import Tokenizer


def vision_args(v):
    return VisionArgs(
        image_size=Size(height=v["image_size"], width=v["image_size"]),
        patch_size=Size(height=v["patch_size"], width=v["patch_size"]),
        dim=1, n_layers=1, n_heads=1, mlp_ratio=1.0, output_dim=1,
        pixel_shuffle_ratio=v["pixel_shuffle_ratio"],
    )


def to_raw_content(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    items = []
    for part in content:
        if isinstance(part, str):
            items.append(RawTextItem(text=part))
        elif part["type"] == "text":
            items.append(RawTextItem(text=part["text"]))
        elif part["type"] == "image":
            items.append(RawMediaItem(data=Path(part["image"]).read_bytes()))
        else:
            raise ValueError(f"oracle: unsupported part {part['type']}")
    return items


def to_raw_message(m):
    calls = []
    for i, c in enumerate(m.get("tool_calls") or []):
        fn = c["function"]
        args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
        calls.append(ToolCall(call_id=str(i), tool_name=fn["name"], arguments=args))
    stop = {"eom": StopReason.end_of_message, "eot": StopReason.end_of_turn}.get(m.get("stop_reason"))
    return RawMessage(
        role="tool" if m["role"] in ("tool", "ipython") else m["role"],
        content=to_raw_content(m.get("content")),
        context=to_raw_content(m["context"]) if m.get("context") is not None else None,
        stop_reason=stop,
        tool_calls=calls,
    )


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.get_instance()
    results = {"chat": [], "decode": []}

    for i, case in enumerate(spec.get("chat", [])):
        v = case.get("vision")
        fmt = ChatFormat(tok, vision_args(v) if v else None, max_num_chunks=(v or {}).get("max_num_tiles", 16))
        llm_input = fmt.encode_dialog_prompt(
            [to_raw_message(m) for m in case["messages"]],
            ToolPromptFormat(case.get("tool_prompt_format", "json")),
        )
        results["chat"].append({"tokens": [int(t) for t in llm_input.tokens]})
        images = llm_input.images or []
        np.savez(out / f"chat_{i}.npz", **{f"image_{k}": x.numpy() for k, x in enumerate(images)})

    plain = ChatFormat(tok)
    for case in spec.get("decode", []):
        msg = plain.decode_assistant_message(case["tokens"], StopReason.out_of_tokens)
        results["decode"].append({
            "content": msg.content,
            "stop_reason": msg.stop_reason.value,
            "tool_calls": [
                {"name": getattr(c.tool_name, "value", c.tool_name), "arguments": c.arguments} for c in msg.tool_calls
            ],
        })

    for i, case in enumerate(spec.get("images", [])):
        image = convert_image_to_rgb(Image.open(io.BytesIO(Path(case["path"]).read_bytes())))
        size = case["tile_size"]
        tiles, ar = VariableSizeImageTransform(size)(image, max_num_chunks=case["max_num_tiles"])
        global_tile = ResizeNormalizeImageTransform(size, size)(image)
        np.savez(out / f"image_{i}.npz", tiles=tiles.numpy(), global_tile=global_tile.numpy(), grid=np.array(ar))

    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
