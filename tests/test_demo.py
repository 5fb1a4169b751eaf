"""The README's main command, end to end at smoke size: data, start model, sweep, export, report."""
from __future__ import annotations

import pytest
from conftest import cli


@pytest.mark.slow
def test_demo_smoke_runs_every_step(tmp_path):
    p = cli("demo", "--workdir", tmp_path / "demo", "--smoke-test", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in p.stdout
    assert "best trial" in p.stdout and "verdict on masking" in p.stdout
    assert (tmp_path / "demo" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "export" / "verification.json").is_file()
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
