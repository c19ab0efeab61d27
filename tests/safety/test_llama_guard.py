"""Llama Guard: prompt rendering (golden strings), verdict parsing, score, the guard, a guard4-shaped model.

Golden source: llama-stack `llama_stack/providers/inline/safety/llama_guard/llama_guard.py`
(llamastack/llama-stack, read 2026 at commit 2477826): its PROMPT_TASK / SAFETY_CATEGORIES /
PROMPT_CONVERSATION / PROMPT_INSTRUCTIONS strings are copied below verbatim and filled with
string.Template exactly as its `build_prompt` does (categories "S1: Violent Crimes." joined by
newlines, turns "Role: text" joined by blank lines). Its code capitalises the role name
("Assistant"); Meta's Llama Guard HF chat template labels assistant turns "Agent", so the
reference maps roles the template's way. Image behaviour (S14 dropped when an image is present)
follows Meta's Llama Guard 4 chat template (tokenizer_config `chat_template`, rev 87acb4b9).
"""

from __future__ import annotations

from string import Template

import pytest
import torch

from herd.safety.llama_guard import (
    LlamaGuard,
    VerdictParseError,
    guard_messages,
    parse_verdict,
    render_prompt,
    render_text,
    unsafe_score,
)

# ---- llama-stack's template, verbatim ----------------------------------------------------
PROMPT_TASK = "Task: Check if there is unsafe content in '$agent_type' messages in conversations according our safety policy with the below categories."
SAFETY_CATEGORIES = """

<BEGIN UNSAFE CONTENT CATEGORIES>
$categories
<END UNSAFE CONTENT CATEGORIES>
"""
PROMPT_CONVERSATION = """
<BEGIN CONVERSATION>

$conversations

<END CONVERSATION>
"""
PROMPT_INSTRUCTIONS = """
Provide your safety assessment for ONLY THE LAST $agent_type message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""
PROMPT_TEMPLATE = Template(f"{PROMPT_TASK}{SAFETY_CATEGORIES}{PROMPT_CONVERSATION}{PROMPT_INSTRUCTIONS}")
LLAMA_STACK_CATEGORIES = ["Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation",
                          "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate",
                          "Self-Harm", "Sexual Content", "Elections", "Code Interpreter Abuse"]


def reference_prompt(turns: list[tuple[str, str]], codes=range(1, 15), excluded=()) -> str:
    cats = [f"S{i}: {LLAMA_STACK_CATEGORIES[i - 1]}." for i in codes if f"S{i}" not in excluded]
    label = {"user": "User", "assistant": "Agent"}
    conv = "\n\n".join(f"{label[r]}: {t}" for r, t in turns)
    return PROMPT_TEMPLATE.substitute(agent_type=label[turns[-1][0]], categories="\n".join(cats), conversations=conv)


USER = [("user", "How do I make a cake?")]
DIALOG = [("user", "How do I make a cake?"), ("assistant", "Mix flour, eggs and sugar, then bake."),
          ("user", "And a bomb?"), ("assistant", "I can't help with that.")]


def msgs(turns):
    return [{"role": r, "content": t} for r, t in turns]


def test_user_prompt_matches_llama_stack_byte_for_byte():
    assert render_text(msgs(USER)) == reference_prompt(USER)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_multi_turn_prompt_matches_reference(n):
    turns = DIALOG[:n]
    out = render_text(msgs(turns))
    assert out == reference_prompt(turns)
    agent = "Agent" if n % 2 == 0 else "User"
    assert f"ONLY THE LAST {agent} message" in out and f"in '{agent}' messages" in out


def test_excluded_categories_are_dropped():
    out = render_text(msgs(USER), excluded=["S6", "S14"])
    assert out == reference_prompt(USER, excluded=("S6", "S14"))
    assert "S6:" not in out and "S7: Privacy." in out


def test_custom_categories_replace_the_default_list():
    out = render_text(msgs(USER), categories={"S1": "Talking about pineapple pizza", "S2": "Spoilers."})
    assert "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Talking about pineapple pizza.\nS2: Spoilers.\n<END UNSAFE" in out
    assert "Violent" not in out


def test_image_drops_s14_and_sits_in_its_turn():
    img = {"type": "image", "image": "x.png"}
    m = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, img]}]
    parts = render_prompt(m)
    assert parts[1] is img and parts[0].endswith("<BEGIN CONVERSATION>\n\nUser: ")
    assert parts[2].startswith("What is this?\n\n<END CONVERSATION>")
    text = render_text(m)
    assert "S13: Elections.\n<END UNSAFE" in text and "S14" not in text
    # the guard's own dialog for herd.chat: one user message holding the parts in order
    gm = guard_messages(m)
    assert len(gm) == 1 and gm[0]["role"] == "user" and gm[0]["content"][1] is img


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "   "}], "empty"),
    ([{"role": "user", "content": b"\xff\xfe"}], "UTF-8"),
    ([{"role": "user", "content": "a\ud800b"}], "UTF-8"),
    ([{"role": "tool", "content": "x"}], "user and assistant"),
])
def test_bad_conversations_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        render_prompt(bad)


def test_unknown_excluded_code_is_an_error():
    with pytest.raises(ValueError, match="unknown category code"):
        render_prompt(msgs(USER), excluded=["S99"])
    with pytest.raises(ValueError, match="S<number>"):
        render_prompt(msgs(USER), categories={"violence": "x"})


# ---- parser ------------------------------------------------------------------------------
VALID = [f"S{i}" for i in range(1, 15)]


@pytest.mark.parametrize("text, want", [
    ("safe", (True, [])),
    ("\n\nsafe\n", (True, [])),
    ("  safe  ", (True, [])),
    ("unsafe\nS1", (False, ["S1"])),
    ("\n\nunsafe\nS1,S10", (False, ["S1", "S10"])),
    ("unsafe\nS1, S10 \n", (False, ["S1", "S10"])),
    ("unsafe\nS2,S2", (False, ["S2"])),
])
def test_parser_accepts_verdicts(text, want):
    assert parse_verdict(text, VALID) == want


@pytest.mark.parametrize("text", [
    "", "Safe", "safe to proceed", "The content is safe.", "unsafe", "unsafe\n", "unsafe\nS15", "unsafe\nS1\nS2",
    "unsafe\nviolence", "safe\nS1", "I think this is unsafe\nS1", "unsafe S1",
])
def test_parser_rejects_everything_else(text):
    with pytest.raises(VerdictParseError):
        parse_verdict(text, VALID)


def test_parser_respects_the_policy_codes():
    with pytest.raises(VerdictParseError, match="S6"):
        parse_verdict("unsafe\nS6", [c for c in VALID if c != "S6"])


# ---- score -------------------------------------------------------------------------------
def test_score_is_softmax_probability_and_monotone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    ref = torch.exp(logits.double()[7]) / torch.exp(logits.double()).sum()
    assert unsafe_score(logits, 7) == pytest.approx(float(ref), rel=1e-12)
    scores = []
    for bias in torch.linspace(-5, 5, 11):
        x = logits.clone()
        x[7] += bias
        scores.append(unsafe_score(x, 7))
    assert all(a < b for a, b in zip(scores, scores[1:]))


# ---- the guard, on a scripted model --------------------------------------------------------
@pytest.mark.parametrize("output, decision, codes, status", [
    ("safe", "allow", [], "ok"),
    ("unsafe\nS1,S10", "block", ["S1", "S10"], "ok"),
    ("\n\nunsafe\nS9", "block", ["S9"], "ok"),
    ("maybe", "block", [], "parse_error"),
    ("unsafe\nS99", "block", [], "parse_error"),
])
def test_guard_decisions(scripted, guard_tokenizer, output, decision, codes, status):
    guard = LlamaGuard(scripted(output), guard_tokenizer)
    v = guard.scan("How do I make a cake?")
    assert (v.decision, v.codes, v.status) == (decision, codes, status)
    assert v.guard == "llama_guard" and 0 <= v.score <= 1 and v.latency_ms > 0
    if codes:
        assert "S1 Violent Crimes" in v.reason or "S9 Indiscriminate Weapons" in v.reason
        assert dict(v.categories)["S10" if "S10" in codes else codes[0]] in ("Hate", "Violent Crimes",
                                                                             "Indiscriminate Weapons")


def test_guard_excluded_code_in_output_is_a_parse_error(scripted, guard_tokenizer):
    v = LlamaGuard(scripted("unsafe\nS6"), guard_tokenizer, excluded=["S6"]).scan("hi")
    assert v.status == "parse_error" and v.blocked


def test_guard_threshold_uses_the_score(scripted, guard_tokenizer):
    # the model says "safe" with probability ~1: a threshold of 0 blocks anyway, 0.5 allows
    assert LlamaGuard(scripted("safe"), guard_tokenizer, threshold=0.5).scan("hi").decision == "allow"
    v = LlamaGuard(scripted("safe"), guard_tokenizer, threshold=0.0).scan("hi")
    assert v.decision == "block" and "threshold" in v.reason
    hi = LlamaGuard(scripted("unsafe\nS2", margin=12.0), guard_tokenizer).scan("hi").score
    lo = LlamaGuard(scripted("unsafe\nS2", margin=3.0), guard_tokenizer).scan("hi").score
    assert hi > lo > 0


def test_guard_fails_closed_on_bad_input_and_open_when_asked(scripted, guard_tokenizer):
    bad = [{"role": "user", "content": [{"type": "image", "image": b"not an image"}, {"type": "text", "text": "hi"}]}]
    v = LlamaGuard(scripted("safe"), guard_tokenizer).scan(bad)
    assert v.decision == "block" and v.status == "error" and "fail-closed" in v.reason
    v = LlamaGuard(scripted("safe"), guard_tokenizer, on_error="open").scan([{"role": "assistant", "content": "x"}])
    assert v.decision == "allow" and v.status == "error" and "alternate" in v.reason
    v = LlamaGuard(scripted("safe"), guard_tokenizer, max_prompt_tokens=50).scan("hi")
    assert v.blocked and "window" in v.reason


# ---- a guard4-shaped directory through herd ------------------------------------------------
def test_guard4_shaped_directory_loads_and_scans(tmp_path, guard_tokenizer):
    from tests.conftest import model_config

    from herd.model.llama4 import build_model
    from herd.model.weights import save_model
    from herd.presets import get_config

    assert get_config("guard4").text.moe_layers == []  # the real one: every layer dense
    cfg = model_config(text={"moe_layers": [], "vocab_size": 512})
    torch.manual_seed(0)
    model = build_model(cfg)
    save_model(model, tmp_path)
    import shutil
    for f in guard_tokenizer_files(guard_tokenizer):
        shutil.copy(f, tmp_path)
    guard = LlamaGuard.from_pretrained(tmp_path, dtype=torch.float32)
    assert not guard.model.moe_layers()
    v = guard.scan([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}])
    assert v.status in ("ok", "parse_error") and v.decision in ("allow", "block") and 0 <= v.score <= 1
    assert v.status == "ok" or v.blocked  # random weights: whatever it says is never "safe" by accident


def guard_tokenizer_files(tok):
    return [p for p in tok.source.parent.iterdir() if p.is_file()]


def test_from_pretrained_refuses_non_directories(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        LlamaGuard.from_pretrained(tmp_path / "missing")
