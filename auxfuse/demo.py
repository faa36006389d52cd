"""`python -m auxfuse demo`: train torchvision's GoogLeNet (or Inception v3) with its auxiliary heads on
scikit-learn's handwritten digits (1,797 real 8 x 8 images that ship with the package: no download), using
MultiHeadLoss, then drop the aux heads (eval mode) and report the main head's held-out top-1 accuracy.

With ``--distributed``, under torchrun (``torchrun --nproc-per-node 2 -m auxfuse demo --distributed``), every
process trains a DistributedDataParallel replica on its own shard of each epoch (gloo on CPU, nccl on CUDA);
``--batch-size`` stays the global batch, and only rank 0 prints, evaluates and plots."""

from __future__ import annotations

import argparse
import os
import time
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
    """Top-1 accuracy of the main head in eval mode (aux heads discarded, as the papers do)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = auxfuse.main_logits(model(images[start:start + batch_size].to(device)))
            correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def plot_losses(history: dict[str, list[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in history.items():
        ax.plot(values, label=name, linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (unweighted)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
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


def run(args: argparse.Namespace) -> Optional[float]:
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
    history: dict[str, list[float]] = {}
    used_backend: Optional[str] = None
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        net.train()
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
            for name, value in zip(names, head_losses):
                history.setdefault(name, []).append(value)
            bar.set_postfix({"loss": f"{total:.3f}", **{n: f"{v:.3f}" for n, v in zip(names, head_losses)}})
        if used_backend is None:
            used_backend = auxfuse.explain_backend(outputs, target, backend=args.backend)["chosen"]
    train_seconds = time.perf_counter() - start
    if args.distributed:
        torch.distributed.destroy_process_group()
    if not main_process:
        return None
    accuracy = evaluate(model, test_x, test_y, 256, device)
    processes = f" x {world_size} processes (DDP)" if args.distributed else ""
    print(f"model: {args.model} ({image_size}x{image_size} digits), device: {device}{processes}, "
          f"loss backend: {used_backend}, train time: {train_seconds:.1f} s")
    print(f"held-out top-1 accuracy of the main head (eval mode, aux heads dropped): "
          f"{accuracy * 100:.2f}% on {len(test_y)} images")
    if args.plot:
        plot_losses(history, args.plot, f"{args.model} on digits: per-head training loss")
        print(f"per-head loss curves: {args.plot}")
    return accuracy


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
    parser.add_argument("--plot", default="auxfuse_demo_losses.png", help="PNG of per-head losses ('' to skip)")
    parser.add_argument("--distributed", action="store_true",
                        help="DistributedDataParallel under torchrun: torchrun --nproc-per-node 2 -m auxfuse demo "
                             "--distributed (gloo on CPU, nccl on CUDA; --batch-size is the global batch)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
