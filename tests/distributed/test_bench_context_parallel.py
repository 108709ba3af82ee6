"""bench/bench_context_parallel.py on the CPU with tiny shapes: as a group of one rank (started
without torchrun) and under torchrun with 2 gloo ranks, both modes (the sharded indexer and the
module compiled with context_parallel=True). Checks what the GPU run relies on: every case runs,
the compiled site is rewritten, bytes are counted by step, and the selections equal the
single-device op's where no ties blur them (dense, 16 heads)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--keys", "512", "--queries", "8", "--heads", "16", "--active", "4",
        "--dim", "16", "--k-top", "16", "--candidates", "64", "--block", "64", "--reps", "1",
        "--compile-target", "aot_eager"]


def run_bench(tmp_path: Path, launcher: list[str]) -> dict:
    out = tmp_path / "results"
    done = subprocess.run(launcher + [str(ROOT / "bench" / "bench_context_parallel.py"), *TINY,
                                      "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().splitlines()[-1].startswith("| sharded | misa_hier |")
    return json.loads((out / "context_parallel.json").read_text())


def check_results(results: dict, world: int) -> None:
    assert results["meta"]["world"] == world and results["meta"]["backend"] == "gloo"
    rows = results["rows"]
    assert [(r["mode"], r["variant"]) for r in rows] == [
        (mode, variant) for mode in ("compiled", "sharded")
        for variant in ("dense", "misa", "misa_hier")]
    for row in rows:
        assert row["same_on_every_rank"] and len(row["rank_ms"]) == world
        assert row["rows"] == 8 and row["speedup"] > 0
        steps = set(row["bytes_by_step"])
        assert {"shard agreement", "selection merge"} <= steps
        assert ("router scores" in steps) == (row["variant"] != "dense")
        assert ("candidate threshold" in steps) == (row["variant"] == "misa_hier")
        if row["variant"] == "dense":
            assert row["identical"], row
    for row in rows[:3]:
        assert [s["status"] for s in row["sites"]] == ["rewritten"]


def test_bench_runs_as_one_rank_without_torchrun(tmp_path):
    check_results(run_bench(tmp_path, [sys.executable]), world=1)


@pytest.mark.slow
def test_bench_runs_under_torchrun_with_two_gloo_ranks(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    check_results(run_bench(tmp_path, launcher), world=2)
