"""System-level safety around the model: Llama Guard, Prompt Guard and Code Shield, one pipeline.

    from herd.safety import load_pipeline, LlamaGuard, CodeShield, load_prompt_guard
    pipe = load_pipeline("guards.json")            # GuardConfig as JSON; herd serve --guards reads it
    verdict = pipe.check_input(messages)            # Verdict(decision, guard, categories, score, reason, status, latency_ms)

Files: verdict.py (the one verdict type, taxonomy, block-wins combining, fail-open/closed),
llama_guard.py (prompt, parser, score, guard), prompt_guard.py (normalisation, windows, HF and
herd-trained classifiers), code_shield.py (codeshield + semgrep on fenced code), pipeline.py
(config, order, /v1/moderations), metrics.py, train_prompt_guard.py, train_llama_guard.py, cli.py
(`herd guard`). This package sits above model/inference and never imports FastAPI.
"""

from herd._lazy import lazy_getattr

_API = {
    "Verdict": ("herd.safety.verdict", "Verdict"),
    "CATEGORY_NAMES": ("herd.safety.verdict", "CATEGORY_NAMES"),
    "combine": ("herd.safety.verdict", "combine"),
    "refusal_text": ("herd.safety.verdict", "refusal_text"),
    "LlamaGuard": ("herd.safety.llama_guard", "LlamaGuard"),
    "render_prompt": ("herd.safety.llama_guard", "render_prompt"),
    "parse_verdict": ("herd.safety.llama_guard", "parse_verdict"),
    "load_prompt_guard": ("herd.safety.prompt_guard", "load_prompt_guard"),
    "HFPromptGuard": ("herd.safety.prompt_guard", "HFPromptGuard"),
    "NgramPromptGuard": ("herd.safety.prompt_guard", "NgramPromptGuard"),
    "CodeShield": ("herd.safety.code_shield", "CodeShield"),
    "GuardConfig": ("herd.safety.pipeline", "GuardConfig"),
    "Pipeline": ("herd.safety.pipeline", "Pipeline"),
    "load_pipeline": ("herd.safety.pipeline", "load_pipeline"),
}
__all__ = list(_API)
__getattr__ = lazy_getattr(__name__, _API, globals())
