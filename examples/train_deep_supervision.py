#!/usr/bin/env python
"""Deep supervision, as nnU-Net trains: a small U-Net whose decoder predicts at every scale, each scale
scored against the mask downsampled to its size (nearest neighbour), weighted 1/2^i with the lowest
resolution at 0 and the weights normalised to sum to 1. One call of auxfuse.MultiHeadLoss takes all scales
and the one full-resolution mask:

    criterion = auxfuse.MultiHeadLoss(auxfuse.nnunet_deep_supervision_weights(4), target_resize="nearest",
                                      ignore_index=255)
    loss = criterion(model(images), masks)        # model(images): [full, 1/2, 1/4, 1/8] resolution logits

Runs offline on synthetic shapes (examples/train_segmentation.py's data set: rectangles and ellipses with
void borders), with a progress bar, and draws the per-scale training losses and the held-out pixel accuracy:

    python examples/train_deep_supervision.py --epochs 4 --plot deep_supervision.png
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import auxfuse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling example's data set
from train_segmentation import SyntheticShapes  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Deep supervision with auxfuse.MultiHeadLoss (nnU-Net style)")
    parser.add_argument("--num-classes", default=6, type=int)
    parser.add_argument("--image-size", default=64, type=int, help="divisible by 8 (four scales)")
    parser.add_argument("--train-size", default=512, type=int, help="synthetic training images")
    parser.add_argument("--val-size", default=64, type=int)
    parser.add_argument("-b", "--batch-size", default=16, type=int)
    parser.add_argument("--epochs", default=4, type=int)
    parser.add_argument("--lr", default=0.01, type=float)
    parser.add_argument("--width", default=16, type=int, help="channels of the first level")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--plot", default=None, help="save the per-scale losses and accuracy to this PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs one line per epoch)")
    parser.add_argument("--seed", default=0, type=int)
    return parser.parse_args(argv)


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepSupervisionUNet(nn.Module):
    """A four-level U-Net with a 1x1 segmentation head on every decoder level. In training it returns the
    logits of every scale, highest resolution first (nnU-Net's order); in eval the full-resolution logits."""

    def __init__(self, num_classes, width=16):
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        self.encoders = nn.ModuleList([block(3, widths[0])] + [block(a, b) for a, b in zip(widths, widths[1:])])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:])])
        self.decoders = nn.ModuleList([block(2 * a, a) for a in widths[:-1]])
        self.heads = nn.ModuleList([nn.Conv2d(w, num_classes, 1) for w in widths])

    def forward(self, x):
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        outputs = [self.heads[-1](x)]  # the bottleneck's prediction, 1/8 resolution
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](torch.cat([self.ups[level](x), skips[level]], dim=1))
            outputs.append(self.heads[level](x))
        outputs.reverse()  # highest resolution first
        return outputs if self.training else outputs[0]


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.image_size % 8:
        raise SystemExit(f"--image-size {args.image_size} must be divisible by 8 (four scales)")
    # One data set (its seed fixes the class colours), split into training and held-out images.
    shapes = SyntheticShapes(args.train_size + args.val_size, args.image_size, args.num_classes, seed=args.seed)
    train = torch.utils.data.Subset(shapes, range(args.train_size))
    val = torch.utils.data.Subset(shapes, range(args.train_size, len(shapes)))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size)
    model = DeepSupervisionUNet(args.num_classes, args.width).to(device)
    weights = auxfuse.nnunet_deep_supervision_weights(4)
    criterion = auxfuse.MultiHeadLoss(weights, target_resize="nearest", ignore_index=255)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    print(f"device {device}, weights per scale (full resolution first) {[round(w, 3) for w in weights]}")
    history = {"scale_losses": [], "val_pixel_accuracy": []}
    for epoch in range(args.epochs):
        model.train()
        sums, batches, start = torch.zeros(4, dtype=torch.float64), 0, time.perf_counter()
        progress = _progress(loader, f"epoch {epoch + 1}/{args.epochs}", args.no_progress)
        for images, masks in progress:
            images, masks = images.to(device), masks.to(device)
            out = criterion(model(images), masks, return_details=True)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            sums += out.head_losses.detach().double().cpu()
            batches += 1
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{out.loss.item():.3f}")
        scale_losses = (sums / batches).tolist()
        accuracy = evaluate(model, val_loader, device)
        history["scale_losses"].append(scale_losses)
        history["val_pixel_accuracy"].append(accuracy)
        print(f"epoch {epoch + 1}: loss per scale {[round(v, 3) for v in scale_losses]}, held-out pixel accuracy "
              f"{accuracy:.3f}, {batches * args.batch_size / (time.perf_counter() - start):.0f} images/s")
    if args.plot:
        plot(history, weights, args.plot)
        print(f"saved {args.plot}")
    return history


def evaluate(model, loader, device):
    """Pixel accuracy of the full-resolution head (eval mode returns it alone), void pixels excluded."""
    model.eval()
    correct = counted = 0
    with torch.no_grad():
        for images, masks in loader:
            masks = masks.to(device)
            predicted = model(images.to(device)).argmax(1)
            keep = masks != 255
            correct += int((predicted[keep] == masks[keep]).sum())
            counted += int(keep.sum())
    return correct / max(counted, 1)


def _progress(loader, description, disabled):
    try:
        from tqdm import tqdm
    except ImportError:
        return loader
    return tqdm(loader, desc=description, disable=disabled, leave=False)


def plot(history, weights, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = range(1, len(history["scale_losses"]) + 1)
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for scale in range(len(weights)):
        values = [row[scale] for row in history["scale_losses"]]
        name = "full" if scale == 0 else f"1/{2**scale}"
        losses.plot(epochs, values, marker="o", label=f"{name} resolution (weight {weights[scale]:.2f})")
    losses.set(title="training loss per scale (epoch mean)", xlabel="epoch", ylabel="cross-entropy")
    losses.legend()
    accuracy.plot(epochs, history["val_pixel_accuracy"], marker="o", color="black")
    accuracy.set(title="held-out pixel accuracy, full resolution", xlabel="epoch", ylim=(0, 1))
    for axes in (losses, accuracy):
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
