"""`python -m auxfuse demo`: train torchvision's GoogLeNet (or Inception v3) with its auxiliary heads on
scikit-learn's handwritten digits (1,797 real 8 x 8 images that ship with the package: no download), using
MultiHeadLoss. After every epoch it measures the held-out top-1 accuracy of every head, the aux heads included
(counted by the fused pass that computes the loss); at the end it drops the aux heads (eval mode), reports the
main head's held-out top-1 accuracy, and plots two panels: each head's training loss per epoch and each head's
held-out top-1 per epoch.

With ``--distributed``, under torchrun (``torchrun --nproc-per-node 2 -m auxfuse demo --distributed``), every
process trains a DistributedDataParallel replica on its own shard of each epoch (gloo on CPU, nccl on CUDA);
``--batch-size`` stays the global batch, and only rank 0 prints, evaluates and plots."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

import auxfuse

DEFAULT_IMAGE_SIZE = {"googlenet": 32, "inception_v3": 299}  # about the smallest inputs whose aux heads work


def load_digits(image_size: int, seed: int):
    """Digits as (N, 3, size, size) float tensors, normalized, split 80/20 (stratified, seeded)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=data.target
    )
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def build_model(name: str, num_classes: int = 10) -> torch.nn.Module:
    import torchvision

    if name == "googlenet":
        return torchvision.models.googlenet(
            weights=None, num_classes=num_classes, aux_logits=True, init_weights=True, transform_input=False
        )
    if name == "inception_v3":
        return torchvision.models.inception_v3(
            weights=None, num_classes=num_classes, aux_logits=True, init_weights=True, transform_input=False
        )
    raise ValueError(f"unknown model {name!r}")


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    """Top-1 accuracy of the main head in eval mode (aux heads discarded, as the papers do).

    Example:
        >>> accuracy = evaluate(model, test_x, test_y, 256, torch.device("cpu"))  # doctest: +SKIP
    """
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = auxfuse.main_logits(model(images[start:start + batch_size].to(device)))
            correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def evaluate_heads(model: torch.nn.Module, criterion: auxfuse.MultiHeadLoss, images: torch.Tensor,
                   labels: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """Held-out top-1 accuracy of every head, aux heads included: `head_correct` of the fused loss pass.

    torchvision's GoogLeNet and Inception v3 return their aux heads only while the model's own `training` flag
    is set (`self.training and self.aux_logits` in their forward). So every layer goes to eval mode (BatchNorm
    uses its running statistics and leaves them alone, Dropout is off) and then only the top-level module's
    flag is set again: the forward returns every head, each computed as at inference, and the main head's
    logits are exactly those of eval mode. The model's mode is restored afterwards.

    Example:
        >>> top1 = evaluate_heads(model, auxfuse.MultiHeadLoss(), test_x, test_y, 256, torch.device("cpu"))
        ... # doctest: +SKIP
        >>> sorted(top1)  # doctest: +SKIP
        ['aux_logits1', 'aux_logits2', 'logits']
    """
    was_training = model.training
    model.eval()
    model.training = True  # the top-level flag only (see above): aux heads returned, every layer in eval mode
    hits, counted, names = None, 0, []
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                outputs = model(images[start:start + batch_size].to(device))
                details = criterion(outputs, labels[start:start + batch_size].to(device), return_details=True)
                hits = details.head_correct if hits is None else hits + details.head_correct
                counted += int(details.count)
                names = auxfuse.collect_heads(outputs).names
    finally:
        model.train(was_training)
    return {name: hit / counted for name, hit in zip(names, hits.tolist())}


@dataclass
class DemoHistory:
    """What the demo measured, per epoch: each head's training loss (unweighted, the mean over the epoch's
    samples: every batch weighted by its size, so a short last batch counts for what it holds) and each head's
    held-out top-1 accuracy (from `evaluate_heads`); then the main head's final held-out top-1 in eval mode.

    Example:
        >>> history = DemoHistory({"logits": [1.2, 0.4]}, {"logits": [0.71, 0.93]}, 0.93)
        >>> history.epochs
        2
    """

    train_loss: dict[str, list[float]] = field(default_factory=dict)
    heldout_top1: dict[str, list[float]] = field(default_factory=dict)
    main_top1: Optional[float] = None
    backend: Optional[str] = None
    train_seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return len(next(iter(self.train_loss.values()), []))


def plot_history(history: DemoHistory, path: str, title: str) -> None:
    """Two panels: each head's training loss per epoch (log scale) and each head's held-out top-1 per epoch.

    Example:
        >>> history = DemoHistory({"logits": [1.2, 0.4]}, {"logits": [0.71, 0.93]}, 0.93)
        >>> plot_history(history, "demo.png", "GoogLeNet on digits")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, history.epochs + 1))
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, values in history.train_loss.items():
        loss_ax.plot(epochs, values, marker="o", linewidth=1.5, label=name)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training cross-entropy (unweighted)")
    loss_ax.set_yscale("log")
    loss_ax.set_title("training loss per head (mean over the epoch)")
    for name, values in history.heldout_top1.items():  # same head order as the loss panel: same colors
        top1_ax.plot(epochs, [100 * v for v in values], marker="o", linewidth=1.5, label=name)
    top1_ax.set_xlabel("epoch")
    top1_ax.set_ylabel("held-out top-1 (%)")
    top1_ax.set_ylim(0, 100)
    top1_ax.set_title("held-out top-1 per head (layers in eval mode)")
    for ax, corner in ((loss_ax, "upper right"), (top1_ax, "lower right")):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(loc=corner)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Without --distributed: (0, 1, the chosen device). With it, under torchrun
    (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): one process per rank, nccl on CUDA
    (one GPU per local rank), gloo on CPU."""
    requested = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.distributed:
        return 0, 1, requested
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise SystemExit("--distributed needs torchrun: torchrun --nproc-per-node 2 -m auxfuse demo --distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if requested.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = requested
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of an epoch's order, as DistributedSampler(drop_last=True) deals it: every rank gets
    the same number of samples (so every rank runs the same number of steps), rank r takes r, r + W, ..."""
    usable = len(order) - len(order) % world_size
    return order[:usable][rank::world_size]


def run(args: argparse.Namespace) -> Optional[DemoHistory]:
    """Train, evaluate every head after every epoch, plot; the history on rank 0 (None on the other ranks).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> history = run(parser.parse_args(["--epochs", "1", "--plot", ""]))  # doctest: +SKIP
        >>> history.heldout_top1["aux_logits1"]  # doctest: +SKIP
        [0.52]
    """
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world_size, device = setup_distributed(args)
    main_process = rank == 0
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.model]
    train_x, train_y, test_x, test_y = load_digits(image_size, args.seed)
    model = build_model(args.model).to(device)  # the same seed on every rank: DDP also broadcasts rank 0's
    net = model
    if args.distributed:
        # Every parameter gets a gradient in training (the aux heads' too): no find_unused_parameters needed.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    criterion = auxfuse.MultiHeadLoss(backend=args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world_size} processes")
    rank_batch = args.batch_size // world_size
    rank_samples = len(shard(train_y, rank, world_size))
    steps_per_epoch = (rank_samples + rank_batch - 1) // rank_batch
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    history = DemoHistory()
    train_seconds = 0.0
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        net.train()
        loss_sums: dict[str, float] = {}  # per head: the sum over the epoch's samples, for the epoch's mean
        samples_seen = 0
        order = shard(torch.randperm(len(train_y), generator=generator), rank, world_size)  # same perm on every rank
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=True, dynamic_ncols=True,
                   disable=not main_process)
        for step in bar:
            idx = order[step * rank_batch:(step + 1) * rank_batch]
            images, target = train_x[idx].to(device), train_y[idx].to(device)
            outputs = net(images)
            details = criterion(outputs, target, return_details=True)
            optimizer.zero_grad(set_to_none=True)
            details.loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
            scheduler.step()
            losses = torch.cat([details.loss.detach().reshape(1), details.head_losses])
            if args.distributed:  # the global batch's losses, for the progress bar and the plot
                torch.distributed.all_reduce(losses)
                losses /= world_size
            total, *head_losses = losses.tolist()
            names = auxfuse.collect_heads(outputs).names
            global_batch = len(idx) * world_size  # every rank's step holds as many samples
            for name, value in zip(names, head_losses):
                loss_sums[name] = loss_sums.get(name, 0.0) + value * global_batch
            samples_seen += global_batch
            bar.set_postfix({"loss": f"{total:.3f}", **{n: f"{v:.3f}" for n, v in zip(names, head_losses)}})
        train_seconds += time.perf_counter() - epoch_start
        if history.backend is None:
            history.backend = auxfuse.explain_backend(outputs, target, backend=args.backend)["chosen"]
        for name, loss_sum in loss_sums.items():
            history.train_loss.setdefault(name, []).append(loss_sum / samples_seen)
        if main_process:
            for name, top1 in evaluate_heads(model, criterion, test_x, test_y, 256, device).items():
                history.heldout_top1.setdefault(name, []).append(top1)
            tqdm.write(f"epoch {epoch + 1}: held-out top-1 " + ", ".join(
                f"{name} {values[-1] * 100:.1f}%" for name, values in history.heldout_top1.items()))
    history.train_seconds = train_seconds
    if args.distributed:
        torch.distributed.destroy_process_group()
    if not main_process:
        return None
    history.main_top1 = evaluate(model, test_x, test_y, 256, device)
    processes = f" x {world_size} processes (DDP)" if args.distributed else ""
    print(f"model: {args.model} ({image_size}x{image_size} digits), device: {device}{processes}, "
          f"loss backend: {history.backend}, train time: {train_seconds:.1f} s")
    print(f"held-out top-1 accuracy of the main head (eval mode, aux heads dropped): "
          f"{history.main_top1 * 100:.2f}% on {len(test_y)} images")
    if args.plot:
        plot_history(history, args.plot, f"{args.model} with auxiliary heads on {len(train_y)} + {len(test_y)} "
                                         f"digits ({device}, loss backend {history.backend})")
        print(f"per-head training loss and held-out top-1: {args.plot}")
    return history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(DEFAULT_IMAGE_SIZE), default="googlenet")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 (GoogLeNet), 299 (Inception v3)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--backend", default="auto", help="auto, cuda, triton, cpu or torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--plot", default="auxfuse_demo_losses.png",
                        help="PNG of per-head training loss and held-out top-1 ('' to skip)")
    parser.add_argument("--distributed", action="store_true",
                        help="DistributedDataParallel under torchrun: torchrun --nproc-per-node 2 -m auxfuse demo "
                             "--distributed (gloo on CPU, nccl on CUDA; --batch-size is the global batch)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
