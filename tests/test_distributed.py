"""DistributedDataParallel with MultiHeadLoss, on this machine: 2 processes (torchrun, gloo, localhost, a free
port) give the same loss and parameter gradients as one process on the same global batch, and every aux head's
parameters receive gradients (find_unused_parameters=False raises nothing); and
`torchrun --nproc-per-node 2 -m auxfuse demo --distributed` trains.

This file is also the worker that torchrun starts:
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/test_distributed.py OUT BACKEND...
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import auxfuse

# tests/ is on sys.path: through conftest.py under pytest, as the script's own folder under torchrun.
from oracle import seed_of
from test_training import CPU_BACKEND_NAMES, CPU_BACKENDS, TinyAuxNet, _assert_grads_close, _batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

GLOBAL_BATCH, STEPS, WORLD = 8, 2, 2


def _train(model, criterion, shard=slice(None), all_reduce=None):
    """STEPS SGD steps on the same global batches; this process takes `shard` of each. Returns per step the
    (global) loss and the parameter gradients, and the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    for step in range(STEPS):
        images, target = _batch(n=GLOBAL_BATCH, seed=step, ignore=False)
        loss = criterion(model(images[shard]), target[shard])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP: the gradients are averaged over the processes here
        loss = loss.detach()
        if all_reduce is not None:  # the global batch's loss: the mean of the equal shards' means
            all_reduce(loss)
            loss /= WORLD
        losses.append(loss)
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return {"losses": losses, "grads": grads, "params": [p.detach().clone() for p in model.parameters()]}


def _worker(out: str, backends: list[str]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD
    results = {}
    for backend in backends:
        torch.manual_seed(seed_of(f"rank {rank}"))  # different initial weights on purpose: DDP broadcasts rank 0's
        model = TinyAuxNet().train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        criterion = auxfuse.MultiHeadLoss(backend=backend, label_smoothing=0.1)
        # DistributedSampler's deal: rank r takes samples r, r + W, ...
        results[backend] = _train(ddp, criterion, shard=slice(rank, None, world), all_reduce=dist.all_reduce)
        results[backend]["aux_grad"] = model.aux[-1].weight.grad.clone()
    torch.save(results, f"{out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _torchrun(*args, nproc=WORLD, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "results")
    result = _torchrun(os.path.join(HERE, "test_distributed.py"), out, *CPU_BACKEND_NAMES)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(f"{out}.rank{r}") for r in range(WORLD)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ddp_two_processes_match_one_process(backend, ddp_results):
    torch.manual_seed(seed_of("rank 0"))  # rank 0's initial weights, which DDP broadcast to every rank
    want = _train(TinyAuxNet().train(), auxfuse.MultiHeadLoss(backend=backend, label_smoothing=0.1))
    for rank, results in enumerate(ddp_results):
        got = results[backend]
        for step in range(STEPS):
            torch.testing.assert_close(got["losses"][step], want["losses"][step], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, step {step}: {m}")
            _assert_grads_close(got["grads"][step], want["grads"][step])
        _assert_grads_close(got["params"], want["params"])
        # The aux head was trained through MultiHeadLoss on every rank; and since the second step's forward
        # ran, DDP (find_unused_parameters=False) found every parameter's gradient in the first.
        assert got["aux_grad"].abs().sum() > 0


def test_demo_distributed_torchrun(tmp_path):
    plot = tmp_path / "losses.png"
    result = _torchrun("-m", "auxfuse", "demo", "--distributed", "--epochs", "1", "--max-steps", "2",
                       "--batch-size", "16", "--device", "cpu", "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-4000:]
    # Only rank 0 prints, evaluates and plots.
    assert len(re.findall(r"held-out top-1 accuracy", result.stdout)) == 1, result.stdout
    assert "device: cpu x 2 processes (DDP)" in result.stdout
    assert plot.stat().st_size > 10_000
    assert "epoch 1/1" in result.stderr and "aux_logits1=" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")
def test_demo_distributed_torchrun_nccl(tmp_path):
    """The demo's CUDA route: nccl, one GPU per process (as many processes as GPUs, up to 2)."""
    nproc = min(2, torch.cuda.device_count())
    result = _torchrun("-m", "auxfuse", "demo", "--distributed", "--epochs", "1", "--max-steps", "3",
                       "--batch-size", "32", "--device", "cuda", "--plot", "", nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(re.findall(r"held-out top-1 accuracy", result.stdout)) == 1, result.stdout
    assert "device: cuda:0" in result.stdout


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
