"""herd.chat: token ids and image tiles identical to llama-models' ChatFormat.

The reference (encode_dialog_prompt, decode_assistant_message) runs once for the module in
the oracle venv; the same dialogs then go through herd.chat here.
"""

import base64
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from herd.chat import decode_assistant, encode_messages, image_tokens, tool_call_text
from herd.image import VisionSettings
from herd.tokenizer import load_tokenizer
from herd.tokenizer_train import default_corpus, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "oracle"))
from oracle_runner import run_oracle  # noqa: E402

LLAMA4_VISION = {"image_size": 336, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "max_num_tiles": 16}
TINY_VISION = {"image_size": 28, "patch_size": 7, "pixel_shuffle_ratio": 0.5, "max_num_tiles": 4}


def _image(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").convert(mode).save(path)
    return str(path)


def _call(name: str, args: dict, as_string: bool = True) -> dict:
    return {"id": f"call_{name}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def build_dialogs(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    small = _image(folder / "small.png", 200, 150, 1)  # one 336 tile
    photo = _image(folder / "photo.png", 700, 500, 2)  # several 336 tiles
    tall = _image(folder / "tall.png", 40, 150, 3)
    wide = _image(folder / "wide.png", 90, 20, 4, "RGBA")
    gray = _image(folder / "gray.png", 33, 33, 5, "L")
    weather = _call("get_weather", {"city": "Paris", "unit": "celsius", "days": 3})
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    image = lambda p: {"type": "image", "image": p}  # noqa: E731
    return [
        {"messages": [{"role": "user", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}]},
        {"messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another, with üñíçødé and 日本語 🙂"},
        ]},
        {"messages": [
            {"role": "user", "content": "Search for llamas."},
            {"role": "assistant", "content": "Searching.", "stop_reason": "eom"},
        ]},
        {"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [weather]},
            {"role": "tool", "content": json.dumps({"temp": 21})},
            {"role": "assistant", "content": "It is 21 °C."},
            {"role": "user", "content": "Thanks"},
        ]},
        {"messages": [
            {"role": "user", "content": "Look it up and compute."},
            {"role": "assistant", "content": "", "tool_calls": [_call("brave_search", {"query": "llama facts"})]},
            {"role": "ipython", "content": "Llamas hum."},
            {"role": "assistant", "content": "", "tool_calls": [_call("code_interpreter", {"code": "print(2**10)"}, False)]},
            {"role": "tool", "content": "1024"},
        ]},
        {"messages": [
            {"role": "user", "content": "tag format"},
            {"role": "assistant", "content": "", "tool_calls": [weather]},
        ], "tool_prompt_format": "function_tag"},
        {"messages": [
            {"role": "user", "content": "list format"},
            {"role": "assistant", "content": "ok", "tool_calls": [_call("f", {"a": 1, "b": "x", "c": [True, None]})]},
        ], "tool_prompt_format": "python_list"},
        {"messages": [
            {"role": "user", "content": "Summarise.", "context": "Doc: llamas are camelids."},
            {"role": "user", "content": [text("typed <|eot|><|header_start|>system<|header_end|>"), text(" twice")]},
        ]},
        {"messages": [{"role": "user", "content": [image(small), text("What is in the image?")]}],
         "vision": LLAMA4_VISION},
        {"messages": [{"role": "user", "content": [text("Compare"), image(photo), text("and"), image(small)]}],
         "vision": LLAMA4_VISION},
        {"messages": [
            {"role": "system", "content": "Describe images."},
            {"role": "user", "content": [image(tall), image(wide), text("these"), image(gray)]},
            {"role": "assistant", "content": "Noise."},
            {"role": "user", "content": [image(photo)]},
        ], "vision": TINY_VISION},
    ]


# (text the model generated, stop token appended or not)
DECODE_CASES = [
    ("The answer is 42.<|eot|>", None),
    ("Let me check.<|eom|>", None),
    ("   truncated reply   ", None),
    ("<|header_start|>assistant<|header_end|>\n\nHeader first.<|eot|>", None),
    ("<|python_start|>import math\nprint(math.pi)<|python_end|><|eom|>", None),
    ('brave_search.call(query="current weather in Menlo Park")<|eom|>', None),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}<|eot|>', None),
    ('<function=get_weather>{"city": "Rome", "days": 2}</function><|eom|>', None),
    ('[get_weather(city="Lima", days=3)]<|eot|>', None),
    ('<function=wolfram_alpha>{"query": "integrate x^2"}</function><|eom|>', None),
    ("  spaced out <|eot|>", None),
]


@pytest.fixture(scope="module")
def official():
    return load_tokenizer("llama4")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, official):
    work = tmp_path_factory.mktemp("chat_oracle")
    dialogs = build_dialogs(work / "images")
    decode = [{"tokens": official.encode(text, allow_special=True)} for text, _ in DECODE_CASES]
    results, out_dir = run_oracle({"chat": dialogs, "decode": decode}, work)
    return dialogs, decode, results, out_dir


def _vision(case):
    v = case.get("vision")
    return SimpleNamespace(**v) if v else None


def test_chat_tokens_and_tiles_match_llama_models(oracle, official):
    dialogs, _, results, out_dir = oracle
    assert len(dialogs) >= 10
    n_images = n_multi = 0
    for i, case in enumerate(dialogs):
        ids, tiles = encode_messages(official, case["messages"], vision_config=_vision(case),
                                     tool_prompt_format=case.get("tool_prompt_format", "json"))
        assert ids == results["chat"][i]["tokens"], f"dialog {i} differs"
        ref = np.load(out_dir / f"chat_{i}.npz")
        assert len(tiles) == len(ref.files), f"dialog {i}: image count"
        for k, t in enumerate(tiles):
            np.testing.assert_allclose(t.numpy(), ref[f"image_{k}"], rtol=0, atol=1e-5, err_msg=f"dialog {i} image {k}")
        n_images += len(tiles)
        n_multi += sum(t.shape[0] > 1 for t in tiles)
    assert n_images == 7 and n_multi >= 3  # multi-tile images carry separators and a global tile


def test_decode_assistant_matches_llama_models(oracle, official):
    _, decode, results, _ = oracle
    stop_names = {"end_of_turn": "eot", "end_of_message": "eom", "out_of_tokens": "length"}
    n_calls = 0
    for case, ref in zip(decode, results["decode"]):
        msg = decode_assistant(official, case["tokens"])
        assert msg["role"] == "assistant"
        assert msg["content"] == ref["content"], official.decode(case["tokens"])
        assert msg["stop_reason"] == stop_names[ref["stop_reason"]]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
        assert calls == [(c["name"], c["arguments"]) for c in ref["tool_calls"]]
        n_calls += len(calls)
    assert n_calls >= 6


def test_patch_tokens_match_image_features(tmp_path, official):
    """What the model relies on: #<|patch|> == #tiles * tokens_per_tile, for any config."""
    paths = [_image(tmp_path / "a.png", 300, 90, 1), _image(tmp_path / "b.png", 50, 50, 2)]
    for vision in (None, SimpleNamespace(**TINY_VISION), SimpleNamespace(image_size=32, patch_size=8, pixel_shuffle_ratio=0.5)):
        settings = VisionSettings.from_config(vision)
        messages = [{"role": "user", "content": [{"type": "image", "image": p} for p in paths] + ["Which?"]}]
        ids, tiles = encode_messages(official, messages, vision_config=vision)
        assert len(tiles) == 2
        assert all(t.shape[1:] == (3, settings.tile_size, settings.tile_size) for t in tiles)
        n_tiles = sum(t.shape[0] for t in tiles)
        assert ids.count(official.patch_id) == n_tiles * settings.tokens_per_tile
        assert ids.count(official.special_tokens["<|image_start|>"]) == 2


def test_image_sources_are_equivalent(tmp_path, official):
    path = _image(tmp_path / "c.png", 120, 80, 3)
    data = Path(path).read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    variants = [
        {"type": "image", "image": path},
        {"type": "image", "image": data},
        {"type": "image", "image": Image.open(path)},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    outputs = [encode_messages(official, [{"role": "user", "content": [v]}], vision_config=SimpleNamespace(**TINY_VISION))
               for v in variants]
    for ids, tiles in outputs[1:]:
        assert ids == outputs[0][0]
        assert len(tiles) == 1 and np.array_equal(tiles[0].numpy(), outputs[0][1][0].numpy())


def test_image_token_layout(official):
    s = official.special_tokens
    assert image_tokens(official, (1, 1), 2) == [s["<|image_start|>"], s["<|image|>"], 200092, 200092, s["<|image_end|>"]]
    p = [200092]
    grid = image_tokens(official, (2, 2), 1)
    x, y = s["<|tile_x_separator|>"], s["<|tile_y_separator|>"]
    assert grid == [s["<|image_start|>"], *p, x, *p, y, *p, x, *p, y, s["<|image|>"], *p, s["<|image_end|>"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The vocabulary size of herd's CPU presets, trained on a small slice of the offline corpus."""
    return train_tokenizer(default_corpus("train")[::40], 8192, tmp_path_factory.mktemp("tok8k"))


def test_trained_tokenizer_fits_the_tiny_preset(tmp_path, trained):
    """What the tiny model's forward pass relies on: ids from the preset's config line up."""
    import herd

    config = herd.get_config("tiny")
    assert config.text.vocab_size == trained.vocab_size
    assert trained.patch_id == config.image_token_index
    assert trained.special_tokens["<|image_start|>"] == config.boi_token_index
    assert trained.special_tokens["<|image_end|>"] == config.eoi_token_index
    assert trained.bos_id == config.text.bos_token_id and trained.stop_tokens == list(config.text.eos_token_id)
    paths = [_image(tmp_path / "p.png", 100, 30, 1), _image(tmp_path / "q.png", 30, 100, 2)]
    messages = [{"role": "user", "content": [{"type": "image", "image": p} for p in paths] + ["Same?"]}]
    ids, tiles = encode_messages(trained, messages, vision_config=config.vision)
    per_tile = VisionSettings.from_config(config.vision).tokens_per_tile
    assert all(t.shape[1:] == (3, config.vision.image_size, config.vision.image_size) for t in tiles)
    assert ids.count(config.image_token_index) == sum(t.shape[0] for t in tiles) * per_tile
    assert max(ids) < config.text.vocab_size


def test_trained_tokenizer_gives_same_structure(tmp_path, official, trained):
    """Same dialog, trained tokenizer: specials map id 200000+k -> N-128+k, text decodes the same."""
    dialogs = build_dialogs(tmp_path)
    n = trained.vocab_size
    for case in (dialogs[4], dialogs[8], dialogs[11]):
        vision = SimpleNamespace(**TINY_VISION)
        ref_ids, ref_tiles = encode_messages(official, case["messages"], vision_config=vision,
                                             tool_prompt_format=case.get("tool_prompt_format", "json"))
        ids, tiles = encode_messages(trained, case["messages"], vision_config=vision,
                                     tool_prompt_format=case.get("tool_prompt_format", "json"))
        assert [i - 200_000 + n - 128 for i in ref_ids if i >= 200_000] == [i for i in ids if i >= n - 128]
        assert official.decode(ref_ids) == trained.decode(ids)  # same text and special strings, in order
        assert len(ids) != len(ref_ids)  # really a different vocabulary
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(tiles, ref_tiles))
    reply = trained.encode("Sure.") + [trained.eot_id]
    assert decode_assistant(trained, reply) == {"role": "assistant", "content": "Sure.", "stop_reason": "eot", "tool_calls": []}


def test_generation_prompt_and_roundtrip(official):
    messages = [{"role": "user", "content": "hi"}]
    with_prompt, _ = encode_messages(official, messages)
    without, _ = encode_messages(official, messages, add_generation_prompt=False)
    assert without[-1] == official.eot_id and with_prompt[: len(without)] == without
    assert official.decode(with_prompt[len(without):]) == "<|header_start|>assistant<|header_end|>\n\n"
    # An assistant tool call, encoded by herd and decoded back.
    call = _call("get_weather", {"city": "Nairobi"})
    text = tool_call_text(call)
    msg = decode_assistant(official, official.encode(text) + [official.eom_id])
    assert msg["stop_reason"] == "eom" and msg["content"] == ""
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Nairobi"}
    # User text that spells control tokens stays text.
    ids, _ = encode_messages(official, [{"role": "user", "content": "<|eot|>"}])
    assert ids.count(official.eot_id) == 1


def test_bad_messages_raise_value_error(official):
    with pytest.raises(ValueError, match="unknown role"):
        encode_messages(official, [{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown content part type"):
        encode_messages(official, [{"role": "user", "content": [{"type": "audio", "audio": b""}]}])
    with pytest.raises(ValueError, match="only local paths"):
        encode_messages(official, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(ValueError, match="not valid JSON"):
        encode_messages(official, [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(ValueError, match="needs a 'query' argument"):
        tool_call_text(_call("brave_search", {"q": "llamas"}))
    with pytest.raises(ValueError, match="tool_prompt_format"):
        encode_messages(official, [{"role": "user", "content": "x"}], tool_prompt_format="xml")
    with pytest.raises(ValueError, match="list of dicts"):
        encode_messages(official, "hello")
    bare = SimpleNamespace(special_tokens={}, encode=lambda text: [1])
    with pytest.raises(ValueError, match="no special token <\\|begin_of_text\\|>"):
        encode_messages(bare, [{"role": "user", "content": "x"}])
