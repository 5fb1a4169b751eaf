"""The README's main command, end to end at smoke size: data, start model, sweep, verdict, export, report."""
from __future__ import annotations

import json

import pytest
from conftest import cli


@pytest.mark.slow
@pytest.mark.timeout(1000)  # above the command's own 900 s, so a slow run fails with its output
def test_demo_smoke_runs_every_step(tmp_path):
    p = cli("demo", "--workdir", tmp_path / "demo", "--smoke-test", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in p.stdout
    assert "best masked" in p.stdout and "best all" in p.stdout and "verdict on test" in p.stdout
    # the first verdict line agrees with the verdict's own numbers
    record = json.loads(next((tmp_path / "demo" / "sweeps").glob("*/verdict.json")).read_text())
    better = [r["a"] for r in record["comparisons"] if r["b"] == "start" and r["group"] == "all" and r["ci_high_mm"] < 0]
    first = next(ln for ln in p.stdout.splitlines() if ln.startswith("Verdict: "))
    assert first == (f"Verdict: {' and '.join(better)} beat the start model on test (all landmarks)." if better else
                     "Verdict: nothing beat the start model on test (all landmarks): keep the start model.")
    # export either published a verified model or said plainly why not
    exported = (tmp_path / "demo" / "export" / "verification.json").is_file()
    assert exported or "export: no fine-tuned trial improved on the start model" in p.stdout
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
