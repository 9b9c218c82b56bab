"""The committed protobuf stubs are exactly what proto/generate.py makes from proto/ now."""

from __future__ import annotations

import subprocess
import sys

from harness.server import REPO_ROOT


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "proto" / "generate.py"), str(tmp_path)], check=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh, "generation produced nothing"
    stale = [str(path) for path, content in fresh.items() if (REPO_ROOT / path).read_bytes() != content]
    assert not stale, f"stale generated code, run `make generate`: {stale}"
