"""The demo: as a user runs it (`python -m auxfuse demo`), and the history behind its two panels."""

import argparse
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import auxfuse
from auxfuse import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOGLENET_HEADS = ["logits", "aux_logits2", "aux_logits1"]  # torchvision's GoogLeNetOutputs field order


def _run_demo(tmp_path, *args):
    plot = tmp_path / "losses.png"
    result = subprocess.run(
        [sys.executable, "-m", "auxfuse", "demo", "--plot", str(plot), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"held-out top-1 accuracy .*: ([\d.]+)%", result.stdout).group(1))
    assert plot.stat().st_size > 10_000  # a real PNG with both panels
    assert "logits=" in result.stderr and "aux_logits1=" in result.stderr  # tqdm shows each head's loss
    return accuracy, result.stdout + result.stderr


def test_demo_one_epoch_runs(tmp_path):
    accuracy, output = _run_demo(tmp_path, "--epochs", "1")
    assert 0.0 <= accuracy <= 100.0
    assert "loss backend:" in output
    assert re.search(r"epoch 1: held-out top-1 logits [\d.]+%, aux_logits2 [\d.]+%, aux_logits1 [\d.]+%", output)


def test_demo_history_holds_both_panels(tmp_path):
    """Per epoch and per head (aux heads included): a training loss and a held-out top-1, and the last epoch's
    main-head top-1 (aux heads returned, every layer in eval mode) equals the eval-mode accuracy reported."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    epochs = 2
    args = parser.parse_args(["--epochs", str(epochs), "--max-steps", "3", "--device", "cpu",
                              "--plot", str(tmp_path / "demo.png")])
    with torch.random.fork_rng():  # the demo seeds torch's global generator for the model's initialization
        history = demo.run(args)
    assert history.epochs == epochs
    assert list(history.train_loss) == GOOGLENET_HEADS
    assert list(history.heldout_top1) == GOOGLENET_HEADS
    for name in GOOGLENET_HEADS:
        assert len(history.train_loss[name]) == epochs
        assert all(math.isfinite(v) and v > 0 for v in history.train_loss[name])
        assert len(history.heldout_top1[name]) == epochs
        assert all(0.0 <= v <= 1.0 for v in history.heldout_top1[name])
    assert history.heldout_top1["logits"][-1] == history.main_top1
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_evaluate_heads_leaves_the_model_as_it_was():
    """Evaluating every head neither updates BatchNorm's running statistics nor changes the model's mode."""
    with torch.random.fork_rng():  # torchvision initializes the weights from torch's global generator
        torch.manual_seed(0)
        model = demo.build_model("googlenet").train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    top1 = demo.evaluate_heads(model, auxfuse.MultiHeadLoss(), images, labels, 4, torch.device("cpu"))
    assert list(top1) == GOOGLENET_HEADS
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items())


@pytest.mark.slow
def test_demo_default_reaches_95_percent(tmp_path):
    accuracy, _ = _run_demo(tmp_path)
    assert accuracy >= 95.0
