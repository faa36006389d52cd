#!/usr/bin/env python
"""ImageNet-style training with auxfuse.MultiHeadLoss, modelled on pytorch/examples' imagenet/main.py.

    python examples/train_imagenet.py -a googlenet /data/imagenet            # train/ and val/ ImageFolders
    python examples/train_imagenet.py -a inception_v3 --dummy                # fake data, no download
    torchrun --nproc-per-node 8 examples/train_imagenet.py -a googlenet /data/imagenet   # DDP, one GPU each

It is the plain ``nn.CrossEntropyLoss`` script with two changes, both marked ``# auxfuse``: the criterion,
and ``auxfuse.main_logits(output)`` in ``accuracy``. With them, GoogLeNet and Inception v3 train with their
auxiliary heads (``GoogLeNetOutputs`` / ``InceptionOutputs`` in training, a Tensor in eval), and any other
classifier (``-a resnet18``) trains exactly as before.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data
import torchvision.datasets as datasets
import torchvision.models as models
import torchvision.transforms as transforms

import auxfuse

MODEL_NAMES = sorted(models.list_models(module=models))
AUX_MODELS = ("googlenet", "inception_v3")  # torchvision classifiers with auxiliary heads


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="ImageNet training with auxfuse.MultiHeadLoss")
    parser.add_argument("data", nargs="?", default="imagenet", help="folder with train/ and val/ in ImageFolder layout")
    parser.add_argument("-a", "--arch", default="resnet18", choices=MODEL_NAMES, metavar="ARCH",
                        help="torchvision classifier, e.g. googlenet | inception_v3 | resnet18 (default: resnet18)")
    parser.add_argument("-j", "--workers", default=4, type=int, help="data loading workers per process")
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument("-b", "--batch-size", default=256, type=int,
                        help="global batch size, split evenly over the processes under torchrun")
    parser.add_argument("--lr", "--learning-rate", default=0.1, type=float)
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int)
    parser.add_argument("--image-size", default=None, type=int, help="default: 299 for inception_v3, else 224")
    parser.add_argument("--num-classes", default=None, type=int,
                        help="default: the number of class folders, or 1000 with --dummy")
    parser.add_argument("--dummy", action="store_true", help="train on torchvision FakeData (no dataset needed)")
    parser.add_argument("--dummy-size", default=(1_281_167, 50_000), type=int, nargs=2, metavar=("TRAIN", "VAL"))
    parser.add_argument("--max-steps", default=0, type=int, help="batches per epoch and per validation (0: all)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", action="store_true",
                        help="autocast: float16 with GradScaler on CUDA, bfloat16 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", default=None, type=int)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK: one process per GPU (nccl), or per CPU share (gloo).
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    distributed = world_size > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    args.rank = dist.get_rank() if distributed else 0

    image_size = args.image_size or (299 if args.arch == "inception_v3" else 224)
    train_dataset, val_dataset = make_datasets(args, image_size)
    num_classes = args.num_classes or (1000 if args.dummy else len(train_dataset.classes))

    log(args, f"=> creating model '{args.arch}' ({num_classes} classes, {image_size}x{image_size} images)")
    extra = {"aux_logits": True, "init_weights": True} if args.arch in AUX_MODELS else {}
    model = models.get_model(args.arch, weights=None, num_classes=num_classes, **extra).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    # auxfuse (1/2): one criterion for every head, weights by the output type (GoogLeNet 1/0.3/0.3, Inception 1/0.4)
    criterion = auxfuse.MultiHeadLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset) if distributed else None
    val_sampler = torch.utils.data.distributed.DistributedSampler(val_dataset, shuffle=False) if distributed else None
    batch_size = args.batch_size // world_size
    pin = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=batch_size, shuffle=train_sampler is None, num_workers=args.workers,
        pin_memory=pin, sampler=train_sampler, drop_last=True)
    val_loader = torch.utils.data.DataLoader(
        val_dataset, batch_size=batch_size, shuffle=False, num_workers=args.workers, pin_memory=pin,
        sampler=val_sampler)

    best_acc1 = 0.0
    for epoch in range(args.epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        train(train_loader, model, criterion, optimizer, scaler, epoch, device, amp_dtype, args)
        acc1 = validate(val_loader, model, criterion, device, amp_dtype, args)
        scheduler.step()
        best_acc1 = max(acc1, best_acc1)
    log(args, f" * best Acc@1 {best_acc1:.3f}")
    if distributed:
        dist.destroy_process_group()


def make_datasets(args, image_size):
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if args.dummy:
        num_classes = args.num_classes or 1000
        train = datasets.FakeData(args.dummy_size[0], (3, image_size, image_size), num_classes, transforms.ToTensor())
        val = datasets.FakeData(args.dummy_size[1], (3, image_size, image_size), num_classes, transforms.ToTensor(),
                                random_offset=args.dummy_size[0])
        return train, val
    train = datasets.ImageFolder(os.path.join(args.data, "train"), transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]))
    val = datasets.ImageFolder(os.path.join(args.data, "val"), transforms.Compose([
        transforms.Resize(image_size * 8 // 7),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ]))
    return train, val


def train(loader, model, criterion, optimizer, scaler, epoch, device, amp_dtype, args):
    meters = [AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f"), AverageMeter("Loss", ":.4e"),
              AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")]
    batch_time, data_time, losses, top1, top5 = meters
    steps = min(len(loader), args.max_steps) if args.max_steps else len(loader)
    model.train()
    end = time.time()
    for i, (images, target) in enumerate(loader):
        if i == steps:
            break
        data_time.update(time.time() - end)
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            output = model(images)
            loss = criterion(output, target)

        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss.item(), images.size(0))
        top1.update(acc1.item(), images.size(0))
        top5.update(acc5.item(), images.size(0))

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == steps - 1:
            log(args, f"Epoch: [{epoch}][{i + 1}/{steps}]\t" + "\t".join(str(m) for m in meters))


def validate(loader, model, criterion, device, amp_dtype, args):
    losses, top1, top5 = AverageMeter("Loss", ":.4e"), AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")
    steps = min(len(loader), args.max_steps) if args.max_steps else len(loader)
    model.eval()
    with torch.no_grad():
        for i, (images, target) in enumerate(loader):
            if i == steps:
                break
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                output = model(images)
                loss = criterion(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            losses.update(loss.item(), images.size(0))
            top1.update(acc1.item(), images.size(0))
            top5.update(acc5.item(), images.size(0))
            if i % args.print_freq == 0 or i == steps - 1:
                log(args, f"Test: [{i + 1}/{steps}]\t{losses}\t{top1}\t{top5}")
    for meter in (losses, top1, top5):
        meter.all_reduce(device)
    log(args, f" * Acc@1 {top1.avg:.3f} Acc@5 {top5.avg:.3f} Loss {losses.avg:.4f}")
    return top1.avg


def accuracy(output, target, topk=(1,)):
    """Top-k accuracy in percent of the model's prediction."""
    # auxfuse (2/2): the main head's logits (training output is GoogLeNetOutputs / InceptionOutputs)
    output = auxfuse.main_logits(output)
    with torch.no_grad():
        maxk = min(max(topk), output.size(1))
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1))
        return [correct[:k].any(0).float().mean() * 100.0 for k in topk]


class AverageMeter:
    def __init__(self, name, fmt=":f"):
        self.name, self.fmt = name, fmt
        self.val = self.sum = self.count = self.avg = 0.0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def all_reduce(self, device):
        """Sum over the processes (validation under torchrun); a no-op in a single process."""
        if dist.is_available() and dist.is_initialized():
            total = torch.tensor([self.sum, self.count], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            self.sum, self.count = total.tolist()
            self.avg = self.sum / max(self.count, 1)

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


def log(args, message):
    if args.rank == 0:
        print(message, flush=True)


if __name__ == "__main__":
    main()
