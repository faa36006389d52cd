#!/usr/bin/env python
"""Multi-token prediction (Meta's multi-token heads, DeepSeek-V3's MTP): a small language model whose trunk
feeds four heads, head k predicting the token k + 1 steps ahead, all four through one shared output layer.
The loss of all heads is one call that never holds their logits:

    loss = auxfuse.multi_head_linear_cross_entropy(head_hiddens, model.output.weight,
                                                   auxfuse.shifted_targets(next_tokens, 4), weights)

Trained on text that ships with Python (the standard library's own source files, split into words and
symbols, the most frequent ones as the vocabulary). ``--compare`` trains the same model twice, each in a
process of its own, once with the naive loss (F.linear then F.cross_entropy per head) and once with auxfuse,
and prints tokens/s and the peak memory of each side by side:

    python examples/train_multi_token.py --compare --steps 30 --plot multi_token.png
    python examples/train_multi_token.py --loss auxfuse --steps 200
"""

import argparse
import collections
import json
import os
import re
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import auxfuse

TOKEN = re.compile(r"\w+|[^\w\s]|\n|[ \t]+")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Multi-token prediction heads with auxfuse")
    parser.add_argument("--loss", default="auxfuse", choices=("auxfuse", "naive"))
    parser.add_argument("--compare", action="store_true", help="train with both losses (a process each)")
    parser.add_argument("--heads", default=4, type=int, help="next-token heads (head k predicts k + 1 ahead)")
    parser.add_argument("--vocab-size", default=16384, type=int)
    parser.add_argument("--corpus-chars", default=1_000_000, type=int, help="characters of stdlib source read")
    parser.add_argument("--context", default=128, type=int)
    parser.add_argument("-b", "--batch-size", default=32, type=int)
    parser.add_argument("--width", default=128, type=int)
    parser.add_argument("--steps", default=100, type=int)
    parser.add_argument("--lr", default=3e-3, type=float)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--plot", default=None, help="save the per-head training losses to this PNG")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the run's result as JSON (what --compare reads)")
    parser.add_argument("--seed", default=0, type=int)
    return parser.parse_args(argv)


def load_corpus(num_chars: int, vocab_size: int):
    """Token ids of the standard library's source (sorted file order: the same text on every run) and the
    vocabulary: the vocab_size - 1 most frequent words / symbols / whitespace runs, then <unk>."""
    folder = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and total < num_chars:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
            total += len(parts[-1])
    words = TOKEN.findall("".join(parts)[:num_chars])
    vocab = [w for w, _ in collections.Counter(words).most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    unknown = len(vocab)
    return torch.tensor([index.get(w, unknown) for w in words], dtype=torch.int64), vocab + ["<unk>"]


class MultiTokenLM(nn.Module):
    """A causal transformer trunk and one small transformer-style block per head (as Meta's multi-token
    model), all heads through one output layer (V, D). forward returns each head's hidden states (B * T, D)."""

    def __init__(self, vocab_size, width, heads, context):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.trunk = nn.TransformerEncoder(layer, 2)
        self.heads = nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                    for _ in range(heads)])
        self.output = nn.Linear(width, vocab_size, bias=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens):
        T = tokens.shape[1]
        h = self.trunk(self.embed(tokens) + self.position[:T], mask=self.causal[:T, :T], is_causal=True)
        return [head(h).reshape(-1, h.shape[-1]) for head in self.heads]


def naive_loss(hiddens, projection, targets, weights):
    """What users write today: each head's full logits, then F.cross_entropy."""
    return sum(w * F.cross_entropy(F.linear(x, projection), t) for w, x, t in zip(weights, hiddens, targets))


def train(args):
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens, vocab = load_corpus(args.corpus_chars, args.vocab_size)
    model = MultiTokenLM(len(vocab), args.width, args.heads, args.context).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    weights = [1.0] + [1.0 / args.heads] * (args.heads - 1)
    generator = torch.Generator().manual_seed(args.seed)
    span = args.context + args.heads  # inputs, then the labels of the furthest head
    history, seen, elapsed = [], 0, 0.0
    steps = range(args.steps)
    if not args.no_progress:
        try:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"{args.loss} loss", leave=False)
        except ImportError:
            pass
    for _ in steps:
        starts = torch.randint(0, len(tokens) - span, (args.batch_size,), generator=generator)
        window = torch.stack([tokens[s:s + span] for s in starts.tolist()]).to(device)
        inputs = window[:, :args.context]
        next_tokens = window[:, 1:args.context + 1]
        # Head k's target at position i is token i + 1 + k: the next tokens shifted left by k (the tail
        # of each window has those tokens, so nothing is ignored here).
        targets = [window[:, 1 + k:args.context + 1 + k].reshape(-1) for k in range(args.heads)]
        assert torch.equal(targets[0], next_tokens.reshape(-1))
        start = time.perf_counter()
        hiddens = model(inputs)
        if args.loss == "auxfuse":
            out = auxfuse.multi_head_linear_cross_entropy(hiddens, model.output.weight, targets, weights,
                                                          return_details=True)
            loss, head_losses = out.loss, out.head_losses
        else:
            loss = naive_loss(hiddens, model.output.weight, targets, weights)
            with torch.no_grad():
                head_losses = torch.stack([F.cross_entropy(F.linear(x, model.output.weight), t)
                                           for x, t in zip(hiddens, targets)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        seen += inputs.numel()
        history.append(head_losses.tolist())
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{loss.item():.3f}")
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": args.loss, "tokens_per_s": seen / elapsed, "peak_MiB": peak_mib, "history": history,
            "vocab": len(vocab), "device": device.type}


def compare(args, argv):
    """Both losses, each in a fresh process (a process's peak memory only grows), printed side by side."""
    results = []
    for loss in ("naive", "auxfuse"):
        command = [sys.executable, os.path.abspath(__file__), *_without_option(argv, "--plot"), "--loss", loss,
                   "--json"]
        command.remove("--compare")
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'loss':>8} {'tokens/s':>10} {'peak memory (MiB)':>18}   ({results[0]['device']}, vocabulary "
          f"{results[0]['vocab']}, {args.heads} heads)")
    for r in results:
        print(f"{r['loss']:>8} {r['tokens_per_s']:>10.0f} {r['peak_MiB']:>18.0f}")
    return results


def _without_option(argv, option):
    """argv without `option` and its value."""
    if option not in argv:
        return list(argv)
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, result in zip(axes[0], results):
        history = torch.tensor(result["history"])
        for k in range(history.shape[1]):
            ax.plot(history[:, k], label=f"head {k} (token +{k + 1})")
        ax.set(title=f"{result['loss']} loss: {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_MiB']:.0f} MiB",
               xlabel="step", ylabel="cross-entropy")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.compare:
        results = compare(args, argv)
    else:
        results = [train(args)]
        if args.json:
            print(json.dumps(results[0]))
            return results
        r = results[0]
        print(f"{r['loss']} loss: {r['tokens_per_s']:.0f} tokens/s, peak memory {r['peak_MiB']:.0f} MiB, final "
              f"losses per head {[round(v, 3) for v in r['history'][-1]]}")
    if args.plot:
        plot(results, args.plot)
        print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main()
