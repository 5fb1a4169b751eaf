"""The benchmark scripts run end to end (each with --smoke-test, in a subprocess, as a user would run it)
and write a record with the machine, the command and the ratios; smoke records never reach
BENCHMARKS.md. Speed goals are not asserted here: they live in the benchmarks' records."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _bench  # noqa: E402  (found through the sys.path line above)

# script -> the ratio lines its record must hold
EXPECTED = {
    "bench_loss_modes.py": ["masked/all hrnet_w18_small_v2 64px", "weighted/all hrnet_w18_small_v2 64px"],
    "bench_freeze.py": ["step freeze3/freeze0"],
    "bench_drift_guard.py": ["step distill/plain", "step bn_eval/plain"],
    "bench_data_path.py": ["decode/cache time per image", "data wait share"],
    "bench_amp.py": ["step bf16/fp32"],
    "bench_ray_overhead.py": ["trial/direct epoch_seconds", "trial/direct per-epoch wall", "sweep wall no-reuse/reuse"],
    "bench_early_stopping.py": ["epochs asha/no-asha", "best val MRE asha/no-asha"],
    "bench_refine.py": ["refine resnet18/masked hrnet_w18_small_v2 64px"],
    "bench_refine_heads.py": ["difficult MRE shared/per-landmark"],
    "bench_refine_passes.py": ["refined MRE chosen passes/1 pass on the verdict split"],
    "bench_imported.py": ["tune_landmarks / plain loop"],
    "bench_resource_policy.py": ["wall distribute/fixed"],
    "bench_sweep_scale.py": ["driver CPU s/result largest/smallest", "driver CPU s/result whole command largest/smallest",
                             "journal bytes per trial largest/smallest"],
}


def _state(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None


@pytest.mark.slow
@pytest.mark.parametrize("script", list(EXPECTED))
def test_smoke_run_writes_its_record(script: str, tmp_path: Path) -> None:
    record = tmp_path / "rec.md"
    before = _state(_bench.BENCHMARKS_MD)
    cmd = [sys.executable, str(SCRIPTS / script), "--smoke-test", "--record", str(record)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    text = record.read_text()
    lines = text.splitlines()
    assert any(ln.startswith("- machine: ") and "threads" in ln for ln in lines), text
    assert any(ln.startswith("- command: ") and script in ln and "--smoke-test" in ln for ln in lines), text
    assert "SMOKE TEST" in text
    for name in EXPECTED[script]:
        assert any(ln.startswith(f"- ratio {name}: ") for ln in lines), f"no ratio line {name!r} in\n{text}"
    assert _state(_bench.BENCHMARKS_MD) == before, "a smoke test touched BENCHMARKS.md"


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**({"smoke_test": False, "record": None} | kw))


def test_record_target_keeps_smoke_runs_out_of_benchmarks_md(tmp_path: Path) -> None:
    assert _bench.record_target(_args()) == _bench.BENCHMARKS_MD
    assert _bench.record_target(_args(smoke_test=True)) is None
    assert _bench.record_target(_args(smoke_test=True, record=str(tmp_path / "r.md"))) == tmp_path / "r.md"
    with pytest.raises(SystemExit, match="never records"):
        _bench.record_target(_args(smoke_test=True, record=str(_bench.BENCHMARKS_MD)))


def test_parse_applies_smoke_defaults_and_demands_five_repeats() -> None:
    p = _bench.parser("t")
    p.add_argument("--size", type=int, default=512)
    a = _bench.parse(p, {"size": 64}, ["--smoke-test"])
    assert (a.size, a.repeats, a.threads) == (64, 2, 1)
    p = _bench.parser("t")
    p.add_argument("--size", type=int, default=512)
    assert _bench.parse(p, {"size": 64}, ["--smoke-test", "--size", "96"]).size == 96
    with pytest.raises(SystemExit):
        _bench.parse(_bench.parser("t"), {}, ["--repeats", "3"])


def test_interleaved_rotates_the_order_and_pairs_the_ratios() -> None:
    import torch

    calls: list[str] = []
    variants = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = _bench.interleaved(variants, repeats=3, device=torch.device("cpu"), warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in times.values())
    assert _bench.paired_ratio({"x": [2.0, 4.0, 9.0], "y": [1.0, 1.0, 3.0]}, "x", "y") == 3.0
