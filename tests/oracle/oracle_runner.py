"""Run tests/oracle/llama_oracle.py inside the oracle venv and return its outputs.

The oracle venv (.venv-oracle, made by scripts/oracle_env.sh) holds llama-models with the
torchvision it needs, which cannot live beside herd's pinned torch. Missing venv = failure,
not a skip: parity with llama-models is the point of these tests.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "llama_oracle.py"


def oracle_python() -> Path:
    return Path(os.environ.get("HERD_ORACLE_PYTHON", REPO / ".venv-oracle" / "bin" / "python"))


def run_oracle(spec: dict, work_dir: Path) -> tuple[dict, Path]:
    """Write `spec`, run the oracle once, return (results.json contents, output dir)."""
    python = oracle_python()
    if not python.exists():
        pytest.fail(
            f"oracle venv not found ({python}): run `scripts/oracle_env.sh` first "
            "(it builds .venv-oracle with llama-models + torchvision for the parity tests)",
            pytrace=False,
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out_dir = work_dir / "oracle_out"
    proc = subprocess.run(
        [str(python), str(SCRIPT), str(spec_path), str(out_dir)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    if proc.returncode != 0:
        pytest.fail(f"oracle failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return json.loads((out_dir / "results.json").read_text()), out_dir
