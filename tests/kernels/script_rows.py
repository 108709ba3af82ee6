"""Runs one of this folder's GPU-build scripts (sm90_builds.py, inductor_writes.py) without the
CPU interpreter and returns the JSON lines it prints. The scripts run in their own process:
sm90_builds.record_launches patches torch and the launchers for the rest of the process."""
import json
import os
import subprocess
import sys
from pathlib import Path


def script_rows(script: Path, timeout: int) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
