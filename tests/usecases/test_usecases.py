"""herd vqa / ask-repo / summarize end to end through the CLI on a tiny random model directory,
and the bad inputs each must refuse with one clear message (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from herd.cli import main

FAST = ["--context", "512", "--max-new-tokens", "8", "--dtype", "float32"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----- vqa ---------------------------------------------------------------------------------------
def test_vqa_answers_about_one_and_five_images(model_dir, png, capsys):
    for n in (1, 5):
        images = [png(f"im{i}.png", seed=i) for i in range(n)]
        rc, out, err = run(capsys, "vqa", *images, "-q", "Which digit?", "--model", model_dir, "--json", *FAST)
        assert rc == 0, err
        assert json.loads(out)["images"] == images


def test_vqa_tiles_each_image_as_the_chat_format_does(model_dir, png):
    from herd.chat import encode_messages
    from herd.usecases.common import load_assistant

    a = load_assistant(str(model_dir), dtype="float32", context=512, max_new_tokens=4)
    images = [png("wide.png", size=(28, 90)), png("tall.png", seed=1, size=(90, 28))]
    ids, pixels = a.encode("What?", images)
    want, tiles = encode_messages(a.tokenizer, [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
        {"type": "text", "text": "What?"}]}], vision_config=a.model.config.vision)
    assert ids == want and pixels.shape[0] == sum(t.shape[0] for t in tiles) > 2


@pytest.mark.parametrize("case", ["six", "missing", "not_an_image"])
def test_vqa_bad_images_exit_2_with_a_message(model_dir, png, tmp_path, capsys, case):
    if case == "six":
        images, msg = [png(f"i{i}.png", seed=i) for i in range(6)], "1 to 5 images"
    elif case == "missing":
        images, msg = [str(tmp_path / "nope.png")], "image not found"
    else:
        bad = tmp_path / "fake.png"
        bad.write_bytes(b"this is not a png")
        images, msg = [str(bad)], "cannot read image"
    rc, out, err = run(capsys, "vqa", *images, "-q", "What?", "--model", model_dir, *FAST)
    assert rc == 2 and msg in err and "Traceback" not in err


# ----- ask-repo ----------------------------------------------------------------------------------
@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "pkg").mkdir(parents=True)
    (r / "build").mkdir()
    (r / "pkg" / "util.py").write_text("def retry(n):\n    return n\n")
    (r / "pkg" / "big.py").write_text("x = 1\n" * 400)
    (r / "main.py").write_text("from pkg.util import retry\n")
    (r / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (r / "build" / "out.py").write_text("generated = True\n")
    (r / "secret.log").write_text("ignored\n")
    (r / ".gitignore").write_text("build/\n*.log\n")
    (r / ".git").mkdir()
    (r / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return r


def test_repo_files_skip_ignored_binary_and_git(repo):
    from herd.usecases.ask_repo import repo_files

    files, skipped = repo_files(repo)
    assert [f.as_posix() for f in files] == [".gitignore", "main.py", "pkg/big.py", "pkg/util.py"]
    assert skipped == {"logo.png": "binary"}


def test_pack_marks_paths_and_names_what_did_not_fit(repo):
    from herd.usecases.ask_repo import pack

    count = len  # characters as tokens: exact arithmetic for the test
    p = pack(repo, "Where is retry defined?", count, budget=300)
    assert p.files == [".gitignore", "main.py", "pkg/util.py"]
    assert '<file path="pkg/util.py">\ndef retry(n):' in p.prompt
    assert p.left_out["pkg/big.py"].startswith("over budget") and p.left_out["logo.png"] == "binary"
    assert p.tokens == len(p.prompt) <= 300


def test_ask_repo_end_to_end_reports_packed_and_left_out(model_dir, repo, capsys):
    rc, out, err = run(capsys, "ask-repo", repo, "-q", "Where is retry defined?", "--model", model_dir,
                       "--json", *FAST)
    assert rc == 0, err
    r = json.loads(out)
    assert "pkg/util.py" in r["packed"] and "pkg/big.py" in r["left_out"] and "logo.png" in r["left_out"]
    assert r["prompt_tokens"] <= 512 - 8


def test_cited_paths_prefers_the_longest_match():
    from herd.usecases.ask_repo import cited_paths

    assert cited_paths("It is in pkg/util.py.", ["util.py", "pkg/util.py", "main.py"]) == ["pkg/util.py"]


@pytest.mark.parametrize("case", ["empty", "missing", "only_binary"])
def test_ask_repo_bad_repositories_exit_2(model_dir, tmp_path, capsys, case):
    r = tmp_path / "r"
    if case != "missing":
        r.mkdir()
    if case == "only_binary":
        (r / "a.bin").write_bytes(b"\0\1\2")
    rc, out, err = run(capsys, "ask-repo", r, "-q", "Where?", "--model", model_dir, *FAST)
    msg = "not found" if case == "missing" else "no text files"
    assert rc == 2 and msg in err and "Traceback" not in err


# ----- summarize ---------------------------------------------------------------------------------
def test_summarize_short_file_in_one_pass(model_dir, tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.\n")
    rc, out, err = run(capsys, "summarize", f, "--model", model_dir, "--json", *FAST)
    assert rc == 0, err
    r = json.loads(out)
    assert r["mode"] == "one pass" and r["chunks"] == 1


def test_summarize_long_file_by_map_reduce(model_dir, tmp_path, capsys):
    f = tmp_path / "long.txt"
    f.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    rc, out, err = run(capsys, "summarize", f, "--model", model_dir, *FAST)
    assert rc == 0, err
    assert "map-reduce over" in err and "chunks" in err


def test_split_chunks_keeps_every_line_within_the_size():
    from herd.usecases.summarize import split_chunks

    text = "".join(f"line {i}\n" for i in range(100)) + "x" * 500 + "\n"
    chunks = split_chunks(text, len, 64)
    assert "".join(chunks) == text and all(len(c) <= 64 for c in chunks)


@pytest.mark.parametrize("case", ["missing", "binary", "empty", "directory"])
def test_summarize_bad_documents_exit_2(model_dir, tmp_path, capsys, case):
    f = tmp_path / "doc"
    if case == "binary":
        f.write_bytes(b"\x7fELF\0\0\1\2" * 10)
    elif case == "empty":
        f.write_text("  \n")
    elif case == "directory":
        f.mkdir()
    rc, out, err = run(capsys, "summarize", f, "--model", model_dir, *FAST)
    msg = {"missing": "not found", "binary": "binary file", "empty": "is empty", "directory": "is a directory"}[case]
    assert rc == 2 and msg in err and "Traceback" not in err
