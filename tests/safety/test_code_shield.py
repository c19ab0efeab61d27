"""Code Shield on known-insecure and safe snippets in four languages, block extraction, fail-closed.

The insecure snippets are the textbook cases codeshield's own rules name (gets → CWE-242 error,
os.system → CWE-78, eval of an expression in JavaScript → CWE-95, MD5 in Java → CWE-327)."""

from __future__ import annotations

import pytest

from herd.safety.code_shield import CodeShield, code_blocks

INSECURE = [
    ("c", "#include <stdio.h>\nint main() {\n  char buf[10];\n  gets(buf);\n  return 0;\n}\n", "block", "CWE-242", 4),
    ("python", "import os\n\ndef run(cmd):\n    os.system(cmd)\n", "warn", "CWE-78", 4),
    ("javascript", "function f(userInput) {\n  return eval(userInput + '1');\n}\n", "warn", "CWE-95", 2),
    ("java", 'import java.security.MessageDigest;\nclass A {\n  void f() throws Exception {\n'
             '    MessageDigest md = MessageDigest.getInstance("MD5");\n  }\n}\n', "warn", "CWE-327", 4),
]
SAFE = [
    ("c", "int add(int a, int b) { return a + b; }\n"),
    ("python", "def add(a, b):\n    return a + b\n"),
    ("javascript", "function add(a, b) { return a + b; }\n"),
    ("java", "class A { int add(int a, int b) { return a + b; } }\n"),
]


@pytest.fixture(scope="module")
def shield():
    return CodeShield()


@pytest.mark.parametrize("lang, code, decision, cwe, line", INSECURE, ids=[x[0] for x in INSECURE])
def test_insecure_snippets_are_flagged_with_cwe_and_reply_line(shield, lang, code, decision, cwe, line):
    reply = f"Here you go:\n\n```{lang}\n{code}```\nHope it helps."
    v = shield.scan(reply)
    assert v.status == "ok" and v.decision == decision, v.reason
    issue = v.details["issues"][0]
    assert issue["cwe"] == cwe and issue["language"] == lang and issue["rule"]
    assert issue["line"] == line + 3  # the block's code starts on the reply's 4th line
    assert reply.splitlines()[issue["line"] - 1] == code.splitlines()[line - 1]
    assert cwe in v.codes and cwe in v.reason


@pytest.mark.parametrize("lang, code", SAFE, ids=[x[0] for x in SAFE])
def test_safe_snippets_pass(shield, lang, code):
    v = shield.scan(f"```{lang}\n{code}```")
    assert (v.decision, v.status, v.details["issues"]) == ("allow", "ok", [])


def test_reply_without_code_is_allowed_without_scanning(shield):
    v = shield.scan("os.system(cmd) is dangerous, never call it on user input.")
    assert v.decision == "allow" and v.reason == "no code blocks"


def test_untagged_block_is_scanned_for_every_language(shield):
    v = shield.scan("```\nimport os\nos.system(cmd)\n```")
    assert v.decision == "warn" and "CWE-78" in v.codes


def test_warn_blocks_option(shield):
    v = CodeShield(warn_blocks=True).scan("```python\nimport os\nos.system(cmd)\n```")
    assert v.decision == "block"


def test_code_blocks_parsing():
    text = "a\n```py\nx = 1\n```\nb\n~~~rust\nfn main() {}\n~~~\n  ```\n  raw\n  ```\n"
    blocks = code_blocks(text)
    assert [(b.language, b.tag, b.start_line) for b in blocks] == [("python", "py", 3), ("rust", "rust", 7),
                                                                    (None, "", 10)]
    assert blocks[0].code == "x = 1\n"


def test_scanner_failure_fails_closed_or_open_by_policy(monkeypatch):
    def boom(self, lang, code):
        raise RuntimeError("semgrep crashed")
    monkeypatch.setattr(CodeShield, "_semgrep", boom)
    reply = "```python\nimport os\nos.system(cmd)\n```"
    closed = CodeShield().scan(reply)
    assert closed.decision == "block" and closed.status == "error" and "semgrep crashed" in closed.reason
    opened = CodeShield(on_error="open").scan(reply)
    assert opened.decision == "allow" and opened.status == "error"


def test_semgrep_that_scans_nothing_is_an_error(monkeypatch, shield):
    """codeshield's own command (--project-root /) scans nothing with semgrep 1.185: herd notices."""
    import subprocess

    real = subprocess.run

    def project_root_slash(cmd, **kw):
        i = cmd.index("--project-root")
        return real(cmd[:i + 1] + ["/"] + cmd[i + 2:], **kw)
    monkeypatch.setattr(subprocess, "run", project_root_slash)
    v = shield.scan("```python\nimport os\nos.system(cmd)\n```")
    assert v.status == "error" and v.blocked and "scanned no file" in v.reason


@pytest.mark.parametrize("bad", ["", "   ", b"\xff```", 42])
def test_bad_input_is_an_error_verdict(shield, bad):
    v = shield.scan(bad)
    assert v.status == "error" and v.blocked
