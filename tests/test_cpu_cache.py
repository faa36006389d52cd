"""The `cpu` backend's cache of large gradient buffers (csrc/cpu/gradient_cache.cpp, auxfuse/cpu_cache.py): a
freed gradient's memory serves the next call of the same size, never memory a live tensor still uses, and the
gradients written into reused memory equal the float64 naive loop's (every element is rewritten)."""

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from oracle import assert_matches_reference, generator, naive_loss, naive_per_head, to_reference

pytestmark = pytest.mark.skipif(auxfuse.available_backends()["cpu"] is not None,
                                reason=str(auxfuse.available_backends()["cpu"]))

ROWS, CLASSES = 1024, 8192  # 32 MiB of fp32 per head: the smallest gradient the cache takes


@pytest.fixture
def cache_on():
    """The cache with room for these tests' buffers, emptied before and after; the old limit restored."""
    limit = auxfuse.cpu_cache_info().limit_bytes
    auxfuse.set_cpu_cache_limit(1 << 30)
    auxfuse.empty_cpu_cache()
    yield
    auxfuse.empty_cpu_cache()
    auxfuse.set_cpu_cache_limit(limit)


def _heads(key, n=2, rows=ROWS, classes=CLASSES):
    g = generator(key)
    return [(torch.randn(rows, classes, generator=g) * 4).requires_grad_(True) for _ in range(n)]


def _targets(key, n=2, rows=ROWS, classes=CLASSES, ignored_from=0):
    g = generator(key)
    targets = [torch.randint(0, classes, (rows,), generator=g) for _ in range(n)]
    for t in targets:
        t[ignored_from::5] = -100  # ignored rows: their gradient is zero, written into reused memory too
    return targets


def _assert_grads_match(heads, naive_of, classes=CLASSES):
    """Each head's .grad against the float64 gradient of naive_of(the heads in float64)."""
    ref_in = [to_reference(h).requires_grad_(True) for h in heads]
    naive_of(ref_in).backward()
    for i, (h, r) in enumerate(zip(heads, ref_in)):
        assert_matches_reference(h.grad, r.grad, torch.float32, classes, msg=f"head {i}")


def test_a_freed_gradient_serves_the_next_call_and_is_rewritten(cache_on):
    weights = [1.0, 0.3]
    heads = _heads("cache heads")
    # The second call ignores other rows than the first: a stale element of either kind would show.
    first_targets, second_targets = _targets("cache first"), _targets("cache second", ignored_from=2)
    auxfuse.multi_head_cross_entropy(heads, first_targets, weights, backend="cpu").backward()
    first_ptrs = {h.grad.data_ptr() for h in heads}
    before = auxfuse.cpu_cache_info()
    for h in heads:
        h.grad = None  # the first call's gradients go back to the cache, their stale values in place
    assert auxfuse.cpu_cache_info().cached_blocks == before.cached_blocks + 2
    auxfuse.multi_head_cross_entropy(heads, second_targets, weights, backend="cpu").backward()
    after = auxfuse.cpu_cache_info()
    assert {h.grad.data_ptr() for h in heads} == first_ptrs
    assert after.hits == before.hits + 2 and after.misses == before.misses
    _assert_grads_match(heads, lambda ref: naive_per_head(ref, second_targets, weights))


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_spatial_heads_rewrite_reused_memory(cache_on, channels_last):
    """Segmentation heads (the spatial tile path; channels_last: the row path over pixels) with 32 MiB gradients:
    the second call ignores other pixels than the first and reads other labels, in the first call's memory."""
    g = generator(("spatial cache", channels_last))
    shape = (2, 16, 512, 512)  # 32 MiB of fp32 per head
    heads = [torch.randn(shape, generator=g) * 3 for _ in range(2)]
    if channels_last:
        heads = [h.contiguous(memory_format=torch.channels_last) for h in heads]
    heads = [h.requires_grad_(True) for h in heads]
    weights = [1.0, 0.4]
    targets = []
    for ignored_from in (0, 3):
        t = torch.randint(0, 16, (2, 512, 512), generator=g)
        t.view(-1)[ignored_from::7] = -100
        targets.append(t)
    auxfuse.multi_head_cross_entropy(heads, targets[0], weights, backend="cpu").backward()
    first_ptrs = {h.grad.untyped_storage().data_ptr() for h in heads}
    for h in heads:
        h.grad = None
    auxfuse.multi_head_cross_entropy(heads, targets[1], weights, backend="cpu", label_smoothing=0.05).backward()
    assert {h.grad.untyped_storage().data_ptr() for h in heads} == first_ptrs
    _assert_grads_match(heads, lambda ref: naive_loss(ref, targets[1], weights, label_smoothing=0.05), classes=16)


def test_memory_in_use_is_never_handed_out(cache_on):
    """Gradients kept by the caller (accumulation, a retained reference) keep their memory and values."""
    weights = [1.0, 0.5]
    heads = _heads("live heads")
    targets = _targets("live targets")
    auxfuse.multi_head_cross_entropy(heads, targets, weights, backend="cpu").backward()
    kept = [h.grad for h in heads]
    expected = [g.clone() for g in kept]
    for h in heads:
        h.grad = None
    auxfuse.multi_head_cross_entropy(heads, _targets("live other"), weights, backend="cpu").backward()
    assert not {h.grad.data_ptr() for h in heads} & {g.data_ptr() for g in kept}
    for g, e in zip(kept, expected):
        assert torch.equal(g, e)


def test_shared_target_gradients_share_one_block(cache_on):
    """The shared-target op writes all heads' gradients into one (H, ...) buffer: reused once all are freed."""
    heads = _heads("shared heads", n=3)
    target = _targets("shared target", n=1)[0]
    weights = [1.0, 0.3, 0.3]
    auxfuse.multi_head_cross_entropy(heads, target, weights, backend="cpu", label_smoothing=0.1).backward()
    base = heads[0].grad.untyped_storage().data_ptr()
    assert all(h.grad.untyped_storage().data_ptr() == base for h in heads)
    before = auxfuse.cpu_cache_info()
    heads[0].grad = None
    assert auxfuse.cpu_cache_info().cached_blocks == before.cached_blocks  # two heads still use it
    for h in heads[1:]:
        h.grad = None
    assert auxfuse.cpu_cache_info().cached_blocks == before.cached_blocks + 1
    auxfuse.multi_head_cross_entropy(heads, target, weights, backend="cpu", label_smoothing=0.1).backward()
    assert heads[0].grad.untyped_storage().data_ptr() == base
    _assert_grads_match(heads, lambda ref: naive_loss(ref, target, weights, label_smoothing=0.1))


def test_a_new_size_releases_the_idle_blocks(cache_on):
    heads = _heads("size heads", n=1)
    auxfuse.multi_head_cross_entropy(heads, _targets("size t", n=1), [1.0], backend="cpu").backward()
    heads[0].grad = None
    assert auxfuse.cpu_cache_info().cached_bytes > 0
    wider = _heads("size wider", n=1, classes=2 * CLASSES)
    targets = _targets("size wider t", n=1, classes=2 * CLASSES)
    auxfuse.multi_head_cross_entropy(wider, targets, [1.0], backend="cpu").backward()
    assert auxfuse.cpu_cache_info().cached_bytes == 0  # the old size went back; the new one is in use
    assert torch.isfinite(wider[0].grad).all()


def test_limit_and_empty(cache_on):
    heads = _heads("limit heads")
    targets = _targets("limit targets")
    auxfuse.multi_head_cross_entropy(heads, targets, [1.0, 1.0], backend="cpu").backward()
    block = heads[0].grad.untyped_storage().nbytes()
    for h in heads:
        h.grad = None
    assert auxfuse.cpu_cache_info().cached_bytes == 2 * block
    auxfuse.set_cpu_cache_limit(block)  # the longest-idle block goes
    info = auxfuse.cpu_cache_info()
    assert (info.cached_bytes, info.cached_blocks, info.limit_bytes) == (block, 1, block)
    auxfuse.empty_cpu_cache()
    assert auxfuse.cpu_cache_info()[:2] == (0, 0)
    auxfuse.set_cpu_cache_limit(0)  # off: freed gradients are not kept
    auxfuse.multi_head_cross_entropy(heads, targets, [1.0, 1.0], backend="cpu").backward()
    for h in heads:
        h.grad = None
    assert auxfuse.cpu_cache_info()[:2] == (0, 0)


def test_small_gradients_do_not_use_the_cache(cache_on):
    before = auxfuse.cpu_cache_info()
    x = torch.randn(64, 100, generator=generator("small"), requires_grad=True)
    t = torch.randint(0, 100, (64,), generator=generator("small t"))
    auxfuse.multi_head_cross_entropy(x, t, backend="cpu").backward()
    ref = to_reference(x).requires_grad_(True)
    F.cross_entropy(ref, t).backward()
    assert_matches_reference(x.grad, ref.grad, torch.float32, 100)
    x.grad = None
    assert auxfuse.cpu_cache_info()[:2] == before[:2]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_a_bad_limit_raises(bad):
    with pytest.raises(ValueError, match="bytes >= 0"):
        auxfuse.set_cpu_cache_limit(bad)


@pytest.mark.slow
@pytest.mark.parametrize("value, expected", [("12345", 12345), ("0", 0), ("lots", None), ("-1", None)])
def test_the_limit_from_the_environment(value, expected):
    """AUXFUSE_CPU_CACHE_BYTES, read when the library loads; anything but a number of bytes warns and keeps the
    default (a quarter of physical memory)."""
    import os
    import subprocess
    import sys

    code = "import auxfuse; print(auxfuse.cpu_cache_info().limit_bytes)"
    env = {**os.environ, "AUXFUSE_CPU_CACHE_BYTES": value}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    limit = int(result.stdout.split()[-1])
    if expected is None:
        assert "is not a number of bytes" in result.stderr
        quarter = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        assert limit == quarter
    else:
        assert limit == expected and "not a number" not in result.stderr
