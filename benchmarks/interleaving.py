"""Interleaved timing for the pytest-benchmark suites: providers take turns within every round."""

import time


def interleaved_rounds(benchmark, steps: dict, seconds: float, min_rounds: int, max_rounds: int,
                       warmup_rounds: int = 1) -> dict:
    """Time `steps` (name -> callable) in rounds where every step runs once in turn, so a change in the
    machine's load hits them alike; pytest-benchmark times the rounds. Returns name -> seconds per round.
    The warm-up rounds (torch.compile compiles there) size the number of rounds to about `seconds`."""
    times = {name: [] for name in steps}

    def one_round():
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    for _ in range(warmup_rounds):
        one_round()
    per_round = sum(t[-1] for t in times.values())
    for t in times.values():
        t.clear()
    benchmark.pedantic(one_round, rounds=int(max(min_rounds, min(max_rounds, seconds / per_round))), iterations=1)
    return times
