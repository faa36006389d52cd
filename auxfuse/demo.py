"""`python -m auxfuse demo`: train torchvision's GoogLeNet (or Inception v3) with its auxiliary heads on
scikit-learn's handwritten digits (1,797 real 8 x 8 images that ship with the package: no download), using
MultiHeadLoss, then drop the aux heads (eval mode) and report the main head's held-out top-1 accuracy."""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> float:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.model]
    train_x, train_y, test_x, test_y = load_digits(image_size, args.seed)
    model = build_model(args.model).to(device)
    criterion = auxfuse.MultiHeadLoss(backend=args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(train_y) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    history: dict[str, list[float]] = {}
    used_backend: Optional[str] = None
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=True, dynamic_ncols=True)
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            images, target = train_x[idx].to(device), train_y[idx].to(device)
            outputs = model(images)
            details = criterion(outputs, target, return_details=True)
            optimizer.zero_grad(set_to_none=True)
            details.loss.backward()
            optimizer.step()
            scheduler.step()
            names = auxfuse.collect_heads(outputs).names
            for name, value in zip(names, details.head_losses.tolist()):
                history.setdefault(name, []).append(value)
            bar.set_postfix({"loss": f"{details.loss.item():.3f}",
                             **{n: f"{v:.3f}" for n, v in zip(names, details.head_losses.tolist())}})
        if used_backend is None:
            used_backend = auxfuse.explain_backend(outputs, target, backend=args.backend)["chosen"]
    train_seconds = time.perf_counter() - start
    accuracy = evaluate(model, test_x, test_y, 256, device)
    print(f"model: {args.model} ({image_size}x{image_size} digits), device: {device}, "
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
