"""examples/quickstart.py runs offline on the bundled model and reports identical greedy outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_offline_on_the_bundled_model():
    python_path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(python_path)}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--max-new-tokens", "12", "--draft-len", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("--- greedy outputs identical: True") == 3
    assert "all greedy outputs identical: True" in done.stdout
    assert "mean accepted draft tokens per verification" in done.stdout
