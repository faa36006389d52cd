import os
import random
import sys
import tempfile

import pytest
import torch

# tests/oracle.py is imported by name from every test module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from oracle import BASE_SEED, seed_of  # noqa: E402

# torch.compile's on-disk cache keys a compiled graph on the graph, not on the fake kernels of the custom ops
# in it: a cache written by an older build of auxfuse can replay that build's output shapes. Each test run
# compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="auxfuse-inductor-"))


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Whatever a test draws without a generator of its own (a model's initial weights, a data loader's
    shuffle) depends on the test's id and AUXFUSE_TEST_SEED alone, never on which tests ran before."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


@pytest.fixture(scope="session")
def emu():
    """torch.ops.auxfuse_emu: the CUDA kernels compiled as C++ on CPU threads (tests/cuda_emulation), built on
    first use; the test is skipped without the CUDA headers."""
    from cuda_emulation.loader import load_emulation

    ops = load_emulation()
    if ops is None:
        pytest.skip("the CUDA headers (cuda_fp16.h, vector_types.h) are needed to compile the emulation")
    return ops


def pytest_report_header(config):
    return f"AUXFUSE_TEST_SEED={BASE_SEED} (set it to run the suite on other random inputs)"
