"""Code Shield: insecure-code detection on the fenced code blocks of a model's reply.

Meta's `codeshield` package (PurpleLlama CodeShield, PyPI 1.0.1) runs its Insecure Code Detector
— regex rules, then semgrep rules when a regex prescan says it is worth it — over generated code,
7+ languages, 50+ CWEs. Upstream `CodeShield.scan_code` returns BLOCK if any issue has severity
error, WARN for lesser issues, IGNORE otherwise, and *fails open*: any exception is logged and
the code reported as safe. herd calls the same detector (`insecure_code_detector.analyze`, use
case CODESHIELD rules: regex first, semgrep when its prescan matches) per block, so a scanner
failure surfaces, and decides with an explicit policy. herd runs semgrep itself: codeshield
1.0.1's command (`--project-root /`) makes semgrep 1.185 scan nothing, a silent fail-open that
herd detects (the report must list the file as scanned) and avoids (the block's temporary
folder is the project root). Decision:

    CodeShield(on_error="closed").scan(reply) -> Verdict
        decision  block (an error-severity issue) | warn (other issues) | allow (none)
        categories [("CWE-78", "<description>"), ...]
        details["issues"]  [{"rule", "cwe", "severity", "line", "language", "description"}]
                           line = the line in the *reply* (block start + line in block)
        on_error  "closed": a scanner exception blocks; "open": allows (upstream's behaviour)

Blocks: ``` fences with an optional info string (```python, ```js, ```c++ ...). A block without
a recognised language is scanned for every language the detector supports (upstream's default).
A reply without code blocks is allowed without running anything. semgrep runs offline with
telemetry off (`--metrics off` is in codeshield's command; SEMGREP_SEND_METRICS=off is set too).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from herd.safety.verdict import ErrorPolicy, Verdict, check_policy, check_text, guarded

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                    re.M | re.S)
LANGUAGE_ALIASES = {
    "python": "python", "py": "python", "python3": "python", "javascript": "javascript", "js": "javascript",
    "node": "javascript", "jsx": "javascript", "typescript": "javascript", "ts": "javascript", "java": "java",
    "c": "c", "h": "c", "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp", "csharp": "csharp",
    "cs": "csharp", "c#": "csharp", "php": "php", "hack": "hack", "rust": "rust", "rs": "rust", "ruby": "ruby",
    "rb": "ruby", "swift": "swift", "kotlin": "kotlin", "kt": "kotlin", "objective-c": "objective_c",
    "objc": "objective_c", "objective-c++": "objective_cpp", "xml": "xml",
}
MAX_CODE_CHARS = 1 << 20


@dataclass
class CodeBlock:
    language: str | None  # codeshield's language name, None = unknown (scan all)
    tag: str              # the fence's info string as written
    code: str
    start_line: int       # 1-based line of the block's first code line in the reply


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced code blocks of a markdown reply, in order."""
    out = []
    for m in _FENCE.finditer(text):
        tag = m.group("info").strip().split()[0].lower() if m.group("info").strip() else ""
        start = text.count("\n", 0, m.start("body")) + 1
        out.append(CodeBlock(LANGUAGE_ALIASES.get(tag), tag, m.group("body"), start))
    return out


class CodeShield:
    """Code Shield over the fenced code blocks of a reply (see the module docstring)."""

    name = "code_shield"

    def __init__(self, on_error: ErrorPolicy = "closed", warn_blocks: bool = False, timeout_s: float = 60.0):
        self.on_error = check_policy(on_error)
        self.timeout_s = timeout_s
        self.warn_blocks = warn_blocks  # treat WARN as BLOCK (stricter deployments)
        os.environ.setdefault("SEMGREP_SEND_METRICS", "off")
        try:
            from codeshield.insecure_code_detector import insecure_code_detector, languages  # noqa: F401
        except ImportError as e:
            raise ValueError(f"Code Shield needs the codeshield and semgrep packages: pip install codeshield semgrep ({e})") from None

    def _analyze(self, block: CodeBlock) -> list:
        """[(language, codeshield Issue)] for one block: codeshield's CODESHIELD use case — regex rules
        first and, when they find nothing and the semgrep prescan regexes match, semgrep."""
        from codeshield.insecure_code_detector import insecure_code_detector as icd, insecure_patterns, languages
        from codeshield.insecure_code_detector.analyzers import Analyzer
        from codeshield.insecure_code_detector.languages import Language
        from codeshield.insecure_code_detector.usecases import UseCase

        langs = [Language(block.language)] if block.language else languages.get_supported_languages()
        found = []
        for lang in langs:
            analyzers = icd.LANGUAGE_ANALYZER_MAP.get(lang, [])
            issues = []
            if Analyzer.REGEX in analyzers:
                issues = icd._run_regex(block.code, insecure_patterns.load(lang, Analyzer.REGEX, UseCase.CODESHIELD))
            if not issues and Analyzer.SEMGREP in analyzers:
                prescan = insecure_patterns.load_prescan_regexes(lang, UseCase.CODESHIELD)
                if not prescan or icd._run_regex(block.code, prescan):
                    issues = self._semgrep(lang, block.code)
            found += [(lang, i) for i in issues]
        return found

    def _semgrep(self, lang, code: str) -> list:
        """semgrep over one block, offline, metrics off. Raises when semgrep fails or scans nothing.

        codeshield 1.0.1 runs semgrep with `--project-root /` on a file in the temp directory; with
        semgrep 1.185 that scans no file and reports no results, so every semgrep rule silently
        passes. herd runs the same command with the temporary folder as the project root and checks
        that the file was scanned."""
        import json
        import subprocess
        import tempfile
        from pathlib import Path

        from codeshield.insecure_code_detector import insecure_code_detector as icd, languages
        from codeshield.insecure_code_detector.usecases import UseCase

        oss = icd.oss
        config = oss.SEMGREP_RULE_REPO_PATH / "_generated_" / f"{lang.value}_{UseCase.CODESHIELD.value}.json"
        if not config.exists():
            config = oss.SEMGREP_RULE_REPO_PATH / lang.value
        with tempfile.TemporaryDirectory(prefix="herd-codeshield-") as d:
            f = Path(d) / f"generated{languages.get_file_extension(lang)}"
            f.write_text(code, encoding="utf-8")
            env = {**os.environ, "SEMGREP_SEND_METRICS": "off", "SEMGREP_ENABLE_VERSION_CHECK": "0"}
            r = subprocess.run(oss.SEMGREP_COMMAND + [str(config), "--project-root", d, str(f)],
                               capture_output=True, text=True, timeout=self.timeout_s, env=env)
            out = r.stdout[r.stdout.find("{"):] if "{" in r.stdout else ""
            try:
                report = json.loads(out)
            except json.JSONDecodeError:
                raise RuntimeError(f"semgrep exited {r.returncode} without a JSON report: "
                                   f"{(r.stderr or r.stdout).strip()[:200]}") from None
            errors = [e for e in report.get("errors", []) if e.get("level") != "warn"]  # partial parses are warnings
            if errors:
                raise RuntimeError(f"semgrep reported errors: {str(errors)[:200]}")
            if str(f) not in report.get("paths", {}).get("scanned", []):
                raise RuntimeError("semgrep scanned no file (its report lists no scanned path)")
            return icd._parse_semgrep_issues(out)

    def scan(self, text) -> Verdict:
        return guarded(self.name, self.on_error, lambda: self._scan(text))

    def _scan(self, text) -> Verdict:
        text = check_text(text, "reply")
        if len(text) > MAX_CODE_CHARS:
            raise ValueError(f"reply is {len(text):,} characters; Code Shield scans at most {MAX_CODE_CHARS:,}")
        blocks = code_blocks(text)
        if not blocks:
            return Verdict("allow", self.name, reason="no code blocks")
        issues = []
        for b in blocks:
            for lang, issue in self._analyze(b):
                rule = str(issue.pattern_id or issue.name or issue.rule or "").split(".")[-1]
                issues.append({"rule": rule, "cwe": issue.cwe_id,
                               "severity": str(getattr(issue.severity, "value", issue.severity)).lower(),
                               "line": (b.start_line + issue.line - 1) if isinstance(issue.line, int) else None,
                               "language": str(getattr(lang, "value", lang)), "description": issue.description})
        if not issues:
            return Verdict("allow", self.name, reason=f"{len(blocks)} code block(s), no insecure patterns",
                           details={"blocks": len(blocks), "issues": []})
        cats = []
        for i in issues:
            if (i["cwe"], i["description"]) not in cats:
                cats.append((i["cwe"], i["description"]))
        severe = any(i["severity"] == "error" for i in issues)
        decision = "block" if severe or self.warn_blocks else "warn"
        reason = "insecure code: " + "; ".join(f"{i['cwe']} at line {i['line']} ({i['rule']})" for i in issues)
        return Verdict(decision, self.name, cats, None, reason, details={"blocks": len(blocks), "issues": issues})
