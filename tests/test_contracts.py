"""The protos are lint-clean and the committed stubs match them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos():
    result = subprocess.run(
        [sys.executable, "scripts/genprotos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_bare_buf_lint_passes_at_the_root():
    buf = shutil.which("buf") or str(ROOT / "node_modules" / ".bin" / "buf")
    assert Path(buf).exists(), "buf is not installed: run scripts/bootstrap"
    subprocess.run(
        [sys.executable, "scripts/genprotos.py", "--check"], cwd=ROOT, check=True, capture_output=True
    )
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path):
    """Guards the lint test itself: buf with our config rejects a non-standard proto."""
    buf = shutil.which("buf") or str(ROOT / "node_modules" / ".bin" / "buf")
    (tmp_path / "buf.yaml").write_text((ROOT / "buf.yaml").read_text())
    proto_dir = tmp_path / "protos" / "epoxi" / "v1"
    proto_dir.mkdir(parents=True)
    (proto_dir / "bad.proto").write_text(
        'syntax = "proto3";\npackage epoxi.v1;\nenum Color { RED = 0; }\nservice Paint { rpc Do(Color2) returns (Color2); }\n'
        "message Color2 {}\n"
    )
    result = subprocess.run([buf, "lint"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ENUM_ZERO_VALUE_SUFFIX" in result.stdout or "UNSPECIFIED" in result.stdout
