"""`python -m auxfuse bench`: interleaved rounds, medians with their interquartile ranges, and the CLI's outputs.
No timing is asserted here: speed is the benchmarks' business, these tests check how it is measured."""

import json
import subprocess
import sys

import pytest
import torch

import auxfuse
from auxfuse import bench


def test_rounds_interleave_providers_and_rotate_the_first():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timing = bench.time_interleaved(steps, "cpu", seconds=0.0, round_ms=0.0, min_rounds=4)
    assert timing.calls_per_block == {"a": 1, "b": 1, "c": 1}  # a block of one call when round_ms is 0
    assert {name: len(samples) for name, samples in timing.samples.items()} == {"a": 4, "b": 4, "c": 4}
    rounds = calls[-12:]  # after the calibration calls: one call per provider per round
    assert rounds == list("abc" "bca" "cab" "abc")


def test_measure_case_rows_hold_medians_spreads_and_errors():
    def broken(heads, target, weights):
        raise RuntimeError("this provider cannot run")

    shape = bench.Shape("tiny", 2, 8, 10)
    loss_fns = {bench.NAIVE: bench.naive_sum, "auxfuse[torch]": lambda heads, target, weights:
                auxfuse.multi_head_cross_entropy(heads, target, weights, backend="torch"), "broken": broken}
    rows = {r.provider: r for r in bench.measure_case(shape, torch.float32, "cpu", "forward+backward", loss_fns,
                                                      seconds=0.02, round_ms=1.0, min_rounds=5)}
    assert rows["broken"].error == "RuntimeError: this provider cannot run"
    for name in (bench.NAIVE, "auxfuse[torch]"):
        row = rows[name]
        assert row.error is None and row.rounds >= 5 and len(row.samples_ms) == row.rounds
        assert row.q1_ms <= row.median_ms <= row.q3_ms
        assert row.speedup_q1 <= row.speedup_vs_naive <= row.speedup_q3
    assert rows[bench.NAIVE].speedup_vs_naive == 1.0  # naive over itself, round by round
    assert rows[bench.NAIVE].rounds == rows["auxfuse[torch]"].rounds  # the same rounds, interleaved


def test_cli_writes_table_json_and_plot(tmp_path):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "auxfuse", "bench", "--device", "cpu", "--shapes", "inception", "--dtype",
         "float32", "--mode", "forward", "--seconds", "0.1", "--round-ms", "2", "--json", str(json_path),
         "--plot", str(plot_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| median ms | IQR ms | vs naive | IQR |" in result.stdout
    saved = json.loads(json_path.read_text())
    assert saved["meta"]["machine"].startswith("CPU, ")
    providers = {row["provider"]: row for row in saved["rows"]}
    assert {"naive eager", "torch.compile(naive)", "auxfuse[torch]"} <= set(providers)
    for row in providers.values():
        assert row["error"] is None, row["error"]
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["speedup_q1"] <= row["speedup_vs_naive"] <= row["speedup_q3"]
    assert plot_path.stat().st_size > 10_000


@pytest.mark.slow  # nine compiles
def test_compiled_provider_stays_compiled_past_the_recompile_limit():
    """One case after another, the compiled naive sum meets more input signatures than dynamo's recompile limit
    (8); each must still be compiled, not silently run eagerly."""
    from torch._dynamo.utils import counters

    compiled = bench.providers("cpu", torch.float32)["torch.compile(naive)"]
    counters.clear()
    for batch in range(4, 13):
        heads, target = bench.make_inputs(bench.Shape("tiny", 2, batch, 10), torch.float32, "cpu", seed=batch)
        loss = compiled(heads, target, [1.0, 0.4])
        torch.testing.assert_close(loss.double(), bench.naive_sum([h.double() for h in heads], target, [1.0, 0.4]),
                                   rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 9


def test_passes_pool_their_rounds():
    """A case timed in two passes (spread over a run) reports the rounds of both, blocks sized once."""
    timer = bench.CaseTimer(bench.Shape("tiny", 2, 8, 10), torch.float32, "cpu", "forward",
                            {bench.NAIVE: bench.naive_sum})
    timer.run_pass(seconds=0.0, round_ms=1.0, min_rounds=3)
    timer.run_pass(seconds=0.0, round_ms=1.0, min_rounds=2)
    (row,) = timer.rows()
    assert row.rounds == 5 and len(row.samples_ms) == 5
    assert row.speedup_vs_naive == 1.0


def test_per_head_shapes_run():
    """Per-head cases (own targets and shifted targets): every provider computes the same loss, and the CLI's
    case timer gives each a row."""
    shapes = [bench.PerHeadShape("tiny_pyramid", ((2, 3, 8, 8), (2, 3, 4, 4)), "own", (1.0, 0.5)),
              bench.PerHeadShape("tiny_tokens", ((12, 9),) * 3, "shifted", (1.0, 0.3, 0.3))]
    for shape in shapes:
        heads, targets = bench.make_inputs(shape, torch.float64, "cpu")
        want = bench.naive_sum(heads, targets, bench.weights_of(shape))
        for name, loss_fn in bench.providers("cpu", torch.float64).items():
            if name != "torch.compile(naive)":
                torch.testing.assert_close(loss_fn(heads, targets, bench.weights_of(shape)), want, msg=name)
        rows = bench.measure_case(shape, torch.float32, "cpu", "forward+backward",
                                  {bench.NAIVE: bench.naive_sum}, seconds=0.02, round_ms=1.0)
        assert rows[0].rounds >= 5 and rows[0].error is None


def test_linear_shape_rows_and_peak_memory():
    """The fused linear + CE case: every provider times, the floor runs without autograd, and the CPU peak
    memory of a provider comes from a process of its own (the naive sum holds every head's logits: more)."""
    shape = bench.LinearShape("linear", 2, 64, 16, 500)
    rows = {r.provider: r for r in bench.measure_case(shape, torch.float32, "cpu", "forward+backward",
                                                      bench.providers("cpu", torch.float32, shape),
                                                      seconds=0.05, round_ms=1.0, min_rounds=3)}
    assert {bench.NAIVE, "torch.compile(naive)", "auxfuse[cpu]", "auxfuse[torch]", "matmuls (floor)"} <= set(rows)
    assert all(r.error is None and r.rounds >= 3 for r in rows.values())
    assert rows[bench.NAIVE].peak_mib is not None and rows["matmuls (floor)"].peak_mib is None
    big = bench.LinearShape("linear", 4, 1024, 16, 32000)  # 4 x 1024 x 32000 fp32 logits: 500 MiB in the naive loop
    naive, fused = (bench.cpu_peak_extra_mib(big, torch.float32, p) for p in (bench.NAIVE, "auxfuse[cpu]"))
    assert naive > 400 and fused < naive / 2
