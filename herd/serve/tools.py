"""Tools for chat completions: the Llama 4 tool prompt, and model output → OpenAI `tool_calls`.

Llama 4 calls tools in the *pythonic* form, a Python list of keyword calls,

    [get_weather(city="Paris"), get_time(tz="CET")]

and Llama 3's JSON form, `{"name": "get_weather", "parameters": {"city": "Paris"}}`, also occurs
(vLLM issues 16214 / 46863: tool calls left inside `content` because a parser expected the other
form). Both are parsed by `herd.chat.decode_assistant`, which reads them the way llama-models does.

    tool_choice  prompt                                        output
    "none"       no tools in the prompt                        content only
    "auto"       tool list in the system turn                  tool_calls if the reply parses as calls
    "required"   tool list + "you MUST call"; reply forced     tool_calls if it parses
                 to start with "["
    {named}      only that tool; reply forced to start with    tool_calls if it parses
                 "[NAME("

The system prompt follows the shape of llama-models' Llama 4 pythonic tool prompt (instructions,
then the function definitions as a JSON list); its wording is herd's. herd has no grammar-
constrained decoding yet, so a model that ignores the forced prefix's lead under required/named
returns its text as content with finish_reason "stop" rather than a fabricated call.

Streaming: a reply that starts like a call ("[", "{", "<function=", <|python_start|>) is held back
until the sequence ends, then sent as `delta.tool_calls` with `index` per call (and the complete
arguments); any other reply streams as content from its first token.
"""

from __future__ import annotations

import json

from herd.serve.errors import BadRequest

CALL_STARTS = ("[", "{", "<function=", "<|python_start|>")

TOOL_INSTRUCTIONS = (
    "You are a helpful assistant and an expert in function composition. You can answer general questions "
    "using your internal knowledge OR invoke functions when necessary. Follow these instructions:\n\n"
    "1. FUNCTION CALLS:\n"
    "- ONLY use functions that are EXPLICITLY listed in the function list below\n"
    "- If a function is needed, write the call(s) in this format and nothing else:\n"
    "  [func_name1(param1=value1, param2=value2), func_name2(param=value)]\n"
    "2. If no function fits, answer the question directly.\n\n"
    "Here is a list of functions in JSON format that you can invoke:\n"
)


def tool_mode(req) -> tuple[str, list, str | None]:
    """→ (mode "none" | "auto" | "required" | "named", the tools to show, the named tool)."""
    tools = list(req.tools or [])
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice not in ("none", "auto"):
            raise BadRequest("tool_choice needs `tools`", param="tool_choice")
        return "none", [], None
    if choice == "none":
        return "none", [], None
    if choice in ("auto", "required"):
        return choice, tools, None
    name = choice.function.name
    named = [t for t in tools if t.function.name == name]
    if not named:
        raise BadRequest(f"tool_choice names {name!r}, which is not in `tools`", param="tool_choice")
    return "named", named, name


def system_prompt(tools: list, mode: str) -> str:
    defs = [{"name": t.function.name, "description": t.function.description or "",
             "parameters": t.function.parameters or {"type": "object", "properties": {}}} for t in tools]
    text = TOOL_INSTRUCTIONS + json.dumps(defs, indent=4)
    if mode in ("required", "named"):
        text += "\n\nYou MUST call " + ("one or more of these functions." if mode == "required"
                                         else f"the function {tools[0].function.name}.")
    return text


def forced_prefix(mode: str, name: str | None) -> str:
    """Text the assistant turn starts with (added to the prompt; the reply continues it)."""
    return {"required": "[", "named": f"[{name}("}.get(mode, "")


def looks_like_call(text: str) -> bool:
    s = text.lstrip()
    return any(s.startswith(c) or c.startswith(s) for c in CALL_STARTS) if s else True


def parse_calls(tokenizer, token_ids: list[int]) -> list[dict]:
    """OpenAI tool_calls found in generated ids (prefix included), or [] when the reply is not calls."""
    from herd.chat import decode_assistant

    return decode_assistant(tokenizer, token_ids)["tool_calls"]
