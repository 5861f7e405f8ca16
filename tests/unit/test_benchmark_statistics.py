"""The interval the benchmarks decide targets by: a distribution-free 95% interval for the median."""

import random
import time

from benchmarks.common import interleaved, median_ci, verdict


def test_the_interval_is_the_textbook_pair_of_order_statistics():
    assert median_ci([5, 1, 4, 2, 3]) is None                       # 5 samples cannot give 95%
    assert median_ci([6, 1, 5, 2, 4, 3]) == (1, 6)                  # 6: min and max (coverage 1 - 2/64)
    assert median_ci(list(range(1, 32))) == (10, 22)                # 31: ranks 10 and 22, as in the tables


def test_it_covers_the_true_median_of_a_skewed_noise_at_least_95_percent_of_the_time():
    rng = random.Random(0)
    true_median = 0.6931471805599453  # of an exponential with rate 1: ln 2
    hits = 0
    for _ in range(1000):
        low, high = median_ci([rng.expovariate(1) for _ in range(31)])
        hits += low <= true_median <= high
    assert hits >= 950


def test_a_target_is_met_only_when_the_whole_interval_is_below_it():
    assert verdict((0.99, 1.02), 1.03) == "met"
    assert verdict((1.04, 1.10), 1.03) == "missed"
    assert verdict((1.00, 1.05), 1.03) == "not resolved"
    assert verdict(None, 1.03) == "too few rounds for an interval"


def test_interleaved_also_records_cpu_time_which_leaves_out_waiting():
    def busy():
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass

    cpu: dict = {}
    wall = interleaved({"busy": busy, "sleep": lambda: time.sleep(0.01)}, rounds=3, per_round=2, cpu=cpu)
    assert [len(wall[k]) for k in ("busy", "sleep")] == [3, 3] and [len(cpu[k]) for k in ("busy", "sleep")] == [3, 3]
    assert all(w >= 0.01 for w in wall["sleep"])               # a sleep takes its wall time ...
    assert all(c < 0.5 * w for c, w in zip(cpu["sleep"], wall["sleep"]))  # ... and almost no CPU time
    assert sum(cpu["busy"]) > sum(cpu["sleep"])


def test_interleaved_rotates_the_order_every_round_so_no_variant_always_runs_first():
    order: list[str] = []
    interleaved({name: (lambda name=name: order.append(name)) for name in "ABC"}, rounds=4, per_round=2)
    assert "".join(order) == "AABBCC" "BBCCAA" "CCAABB" "AABBCC"
