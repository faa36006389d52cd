#!/usr/bin/env python
"""Semantic segmentation with an auxiliary head and auxfuse.MultiHeadLoss, modelled on torchvision's
references/segmentation/train.py (FCN / DeepLabV3 with ``aux_loss=True``).

    python examples/train_segmentation.py --model deeplabv3_resnet50 --synthetic          # no download
    python examples/train_segmentation.py --model fcn_resnet50 --data-path /data/voc      # VOCdevkit/VOC2012
    torchrun --nproc-per-node 8 examples/train_segmentation.py --model deeplabv3_resnet50 --data-path /data/voc

torchvision's reference script computes ``F.cross_entropy(out, t, ignore_index=255) + 0.5 *
F.cross_entropy(aux, t, ignore_index=255)`` by hand; here the criterion is
``auxfuse.MultiHeadLoss({"out": 1.0, "aux": 0.5}, ignore_index=255)``, fed the model's dict as it comes.
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.data
import torchvision
import torchvision.transforms.functional as TF

import auxfuse

MODELS = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Segmentation training with an aux head and auxfuse.MultiHeadLoss")
    parser.add_argument("--model", default="deeplabv3_resnet50", choices=MODELS)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", action="store_true", help="random shapes with void (255) borders, no download")
    data.add_argument("--data-path", help="folder holding VOCdevkit/VOC2012 (Pascal VOC 2012 segmentation)")
    parser.add_argument("--num-classes", default=21, type=int)
    parser.add_argument("--aux-weight", default=0.5, type=float, help="weight of the aux head's loss")
    parser.add_argument("--image-size", default=None, type=int, help="training crop (default: 480 VOC, 96 synthetic)")
    parser.add_argument("--synthetic-size", default=(512, 64), type=int, nargs=2, metavar=("TRAIN", "VAL"))
    parser.add_argument("-b", "--batch-size", default=8, type=int, help="global batch, split over the processes")
    parser.add_argument("--epochs", default=30, type=int)
    parser.add_argument("--max-steps", default=0, type=int, help="batches per epoch and per evaluation (0: all)")
    parser.add_argument("--lr", default=0.02, type=float)
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("-j", "--workers", default=4, type=int)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", action="store_true", help="autocast: float16 with GradScaler on CUDA, bfloat16 on CPU")
    parser.add_argument("-p", "--print-freq", default=10, type=int)
    parser.add_argument("--seed", default=0, type=int)
    return parser.parse_args(argv)


class SyntheticShapes(torch.utils.data.Dataset):
    """Images of 1-4 rectangles and ellipses on a background; each shape's class sets its colour (plus noise).
    Masks hold the class of every pixel, and 255 (void, ignored) on a 2-pixel band around every shape, as in
    Pascal VOC's object boundaries. Deterministic per index."""

    def __init__(self, size, image_size, num_classes, seed=0):
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed
        self.colors = torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.image_size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        mask = torch.zeros(s, s, dtype=torch.int64)
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            cls = int(torch.randint(1, self.num_classes, (), generator=g))
            cy, cx = (torch.rand(2, generator=g) * s).tolist()  # centre
            ry, rx = (torch.rand(2, generator=g) * s / 3 + 4).tolist()  # half height and width
            if torch.rand((), generator=g) < 0.5:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                inside = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            mask[inside] = cls
        image = self.colors[mask].permute(2, 0, 1) + 0.15 * torch.randn(3, s, s, generator=g)
        edges = F.max_pool2d(mask[None, None].float(), 5, 1, 2) != -F.max_pool2d(-mask[None, None].float(), 5, 1, 2)
        mask[edges[0, 0]] = 255
        return TF.normalize(image.clamp(0, 1), MEAN, STD), mask


class VOCPairs(torch.utils.data.Dataset):
    """Pascal VOC 2012 segmentation with the reference script's transforms: random resize, flip and crop
    (padding with 255) for training; resize for evaluation."""

    def __init__(self, root, image_set, crop_size, train):
        self.voc = torchvision.datasets.VOCSegmentation(root, year="2012", image_set=image_set)
        self.crop_size, self.train = crop_size, train

    def __len__(self):
        return len(self.voc)

    def __getitem__(self, index):
        image, mask = self.voc[index]
        image, mask = TF.pil_to_tensor(image), TF.pil_to_tensor(mask)  # uint8 palette indices, 255 = void
        size = int(self.crop_size * (torch.empty(()).uniform_(0.5, 2.0).item() if self.train else 1.0))
        image = TF.resize(image, size, antialias=True)
        mask = TF.resize(mask, size, interpolation=TF.InterpolationMode.NEAREST)
        if self.train:
            if torch.rand(()) < 0.5:
                image, mask = TF.hflip(image), TF.hflip(mask)
            pad_h, pad_w = max(self.crop_size - image.shape[1], 0), max(self.crop_size - image.shape[2], 0)
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=255)
            top = int(torch.randint(0, image.shape[1] - self.crop_size + 1, ()))
            left = int(torch.randint(0, image.shape[2] - self.crop_size + 1, ()))
            image = TF.crop(image, top, left, self.crop_size, self.crop_size)
            mask = TF.crop(mask, top, left, self.crop_size, self.crop_size)
        return TF.normalize(image.float() / 255, MEAN, STD), mask[0].long()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    distributed = world_size > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    args.rank = dist.get_rank() if distributed else 0

    if args.synthetic:
        crop = args.image_size or 96
        train_set = SyntheticShapes(args.synthetic_size[0], crop, args.num_classes, seed=args.seed)
        val_set = SyntheticShapes(args.synthetic_size[1], crop, args.num_classes, seed=args.seed + 1)
        val_batch = args.batch_size // world_size
    else:
        crop = args.image_size or 480
        train_set = VOCPairs(args.data_path, "train", crop, train=True)
        val_set = VOCPairs(args.data_path, "val", crop, train=False)
        val_batch = 1  # evaluation images keep their aspect ratio
    train_sampler = torch.utils.data.distributed.DistributedSampler(train_set) if distributed else None
    val_sampler = torch.utils.data.distributed.DistributedSampler(val_set, shuffle=False) if distributed else None
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size // world_size, shuffle=train_sampler is None, sampler=train_sampler,
        num_workers=args.workers, drop_last=True)  # BatchNorm after global pooling needs > 1 image per batch
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=val_batch, sampler=val_sampler,
                                             num_workers=args.workers)

    model = torchvision.models.get_model(args.model, weights=None, weights_backbone=None,
                                         num_classes=args.num_classes, aux_loss=True).to(device)
    model_without_ddp = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # The reference script's criterion, out + 0.5 * aux with VOC's void label ignored, in one fused pass:
    criterion = auxfuse.MultiHeadLoss({"out": 1.0, "aux": args.aux_weight}, ignore_index=255)
    params = [
        {"params": [p for p in model_without_ddp.backbone.parameters() if p.requires_grad]},
        {"params": [p for p in model_without_ddp.classifier.parameters() if p.requires_grad]},
        {"params": [p for p in model_without_ddp.aux_classifier.parameters() if p.requires_grad], "lr": args.lr * 10},
    ]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    steps = min(len(train_loader), args.max_steps) if args.max_steps else len(train_loader)
    total = max(steps * args.epochs, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / total) ** 0.9)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    log(args, f"=> {args.model}, aux head weight {args.aux_weight}, {args.num_classes} classes, "
              f"{len(train_set)} training images of {crop}x{crop}, {world_size} process(es) on {device}")
    start = time.time()
    invalid_seen = 0  # mask labels outside [0, num_classes), counted on the device by the loss
    for epoch in range(args.epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        model.train()
        for i, (images, masks) in enumerate(train_loader):
            if i == steps:
                break
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                output = model(images)  # {"out": (N, C, H, W), "aux": (N, C, H, W)}
                details = criterion(output, masks, return_details=True)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(details.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            invalid_seen = invalid_seen + details.invalid_targets  # no sync
            if i % args.print_freq == 0 or i == steps - 1:
                if int(invalid_seen):  # e.g. a label >= num_classes: the loss went NaN (CPU raises at once)
                    raise ValueError(f"{int(invalid_seen)} mask labels outside [0, {args.num_classes}) so far")
                out_loss, aux_loss = details.head_losses.tolist()
                log(args, f"Epoch: [{epoch}][{i + 1}/{steps}]  loss {details.loss.item():.4f}  out {out_loss:.4f}  "
                          f"aux {aux_loss:.4f}  lr {optimizer.param_groups[0]['lr']:.5f}  {time.time() - start:.1f} s")
        pixel_acc, iou = evaluate(model, val_loader, device, args, amp_dtype)
        log(args, f"Test: [{epoch}]  pixel accuracy {pixel_acc * 100:.2f}%  mean IoU {iou.nanmean().item() * 100:.2f}%")
    if distributed:
        dist.destroy_process_group()


def evaluate(model, loader, device, args, amp_dtype):
    """Pixel accuracy and per-class IoU of the main head ("out"), void pixels excluded."""
    confusion = torch.zeros(args.num_classes, args.num_classes, dtype=torch.int64, device=device)
    steps = min(len(loader), args.max_steps) if args.max_steps else len(loader)
    model.eval()
    with torch.no_grad():
        for i, (images, masks) in enumerate(loader):
            if i == steps:
                break
            images, masks = images.to(device), masks.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                predicted = auxfuse.main_logits(model(images)).argmax(1)
            keep = masks != 255
            confusion += torch.bincount(masks[keep] * args.num_classes + predicted[keep],
                                        minlength=args.num_classes ** 2).reshape(args.num_classes, -1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    confusion = confusion.double()
    pixel_acc = (confusion.diag().sum() / confusion.sum().clamp(min=1)).item()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    iou = torch.where(union > 0, confusion.diag() / union.clamp(min=1), math.nan)
    return pixel_acc, iou


def log(args, message):
    if args.rank == 0:
        print(message, flush=True)


if __name__ == "__main__":
    main()
