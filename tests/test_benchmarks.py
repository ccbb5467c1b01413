"""Each benchmark script runs end to end on a tiny size (benchmarks are not timed tests)."""
import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_worker_reports_one_configuration():
    out = _run("benchmarks.worker", json.dumps({"height": 16, "width": 24, "batch": 2, "steps": 1, "warmup": 0, "mode": "infer"}))
    r = json.loads(out.strip().splitlines()[-1])
    assert r["images_per_s"] > 0 and r["peak_rss_bytes"] > 0 and "temp_bytes" in r


@pytest.mark.parametrize("script", ["benchmarks.bench_train", "benchmarks.bench_infer"])
def test_grid_scripts_smoke(script):
    out = _run(script, "--smoke", "--no-peer", "--no-record")
    assert "| crnet_jax | 32x40 | 2 |" in out and "error" not in out


def test_scaling_smoke():
    out = _run("benchmarks.bench_scaling", "--smoke", "--no-record", "--mode", "infer")
    assert "pixels: time ~ pixels^" in out and "batch: time ~ batch^" in out


def test_gpu_script_smoke(tmp_path):
    """bench_gpu (written for a GPU machine) runs end to end on this backend: one training and
    one inference row, the copy-bandwidth probe, and the section it would append."""
    out = _run("benchmarks.bench_gpu", "--smoke", "--no-record", "--out", str(tmp_path))
    assert "error" not in out, out
    rows = [json.loads(line) for line in (tmp_path / "gpu_rows.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["train", "infer"]
    assert all(r["images_per_s"] > 0 and r["xla_bytes_accessed"] > 0 for r in rows)
    section = (tmp_path / "gpu_section.md").read_text()
    assert section.startswith("## Accelerator") and "Device-to-device copy here:" in section
    assert "not measured" not in section
