"""A whole training step (forward, loss, backward, SGD update) of GoogLeNet and Inception v3 with their aux
heads, with the naive loss and with MultiHeadLoss: what share of a real step the loss is.

    pytest benchmarks/test_bench_step.py --benchmark-only
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import auxfuse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (model, image size, batch): the demo's GoogLeNet setting, and Inception v3 at its smallest aux-capable size.
CASES = {
    "googlenet": (lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False,
                                                       num_classes=1000), 32, 64),
    "inception_v3": (lambda: torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                                             num_classes=1000), 299, 4 if DEVICE == "cpu" else 64),
}
NAIVE = {
    "googlenet": lambda o, t: F.cross_entropy(o.logits, t) + 0.3 * F.cross_entropy(o.aux_logits1, t)
    + 0.3 * F.cross_entropy(o.aux_logits2, t),
    "inception_v3": lambda o, t: F.cross_entropy(o.logits, t) + 0.4 * F.cross_entropy(o.aux_logits, t),
}


@pytest.mark.parametrize("loss", ["naive", "MultiHeadLoss"])
@pytest.mark.parametrize("model_name", list(CASES))
def test_training_step(benchmark, model_name, loss):
    build, size, batch = CASES[model_name]
    torch.manual_seed(0)
    model = build().to(DEVICE).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=DEVICE)
    target = torch.randint(0, 1000, (batch,), device=DEVICE)
    criterion = NAIVE[model_name] if loss == "naive" else auxfuse.MultiHeadLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), target).backward()
        optimizer.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    step()
    benchmark.group = f"training step: {model_name} {size}x{size} batch {batch}"
    benchmark.pedantic(step, rounds=5 if model_name == "googlenet" else 3, warmup_rounds=1)
    if loss != "naive":
        with torch.no_grad():
            benchmark.extra_info["loss_backend"] = auxfuse.explain_backend(model(images), target)["chosen"]
