"""The demo as a user runs it: `python -m auxfuse demo`."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_demo(tmp_path, *args):
    plot = tmp_path / "losses.png"
    result = subprocess.run(
        [sys.executable, "-m", "auxfuse", "demo", "--plot", str(plot), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"held-out top-1 accuracy .*: ([\d.]+)%", result.stdout).group(1))
    assert plot.stat().st_size > 10_000  # a real PNG with the per-head curves
    assert "logits=" in result.stderr and "aux_logits1=" in result.stderr  # tqdm shows each head's loss
    return accuracy, result.stdout


def test_demo_one_epoch_runs(tmp_path):
    accuracy, stdout = _run_demo(tmp_path, "--epochs", "1")
    assert 0.0 <= accuracy <= 100.0
    assert "loss backend:" in stdout


@pytest.mark.slow
def test_demo_default_reaches_95_percent(tmp_path):
    accuracy, _ = _run_demo(tmp_path)
    assert accuracy >= 95.0
