"""scripts/ab_latency.py: the alternation order and the medians and ratios it reports (the runs themselves
are `python -m secure.measure`, tested in test_runtime/test_bench)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ab_latency.py"
spec = importlib.util.spec_from_file_location("ab_latency", SCRIPT)
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)


def test_each_side_runs_first_in_half_of_the_alternations():
    assert ab.order(3) == ["a", "b", "b", "a", "a", "b"]
    sequence = ab.order(20)
    firsts = sequence[0::2]
    assert len(sequence) == 40 and firsts.count("a") == firsts.count("b") == 10


def test_medians_and_ratios():
    def run(online, rounds):
        return {"online_s_per_image": online, "mb_sent_per_image": 1.0, "mb_received_per_image": 2.0,
                "rounds": rounds, "offline_s": 0.5}
    doc = ab.summary({"a": [run(0.10, 50), run(0.30, 50), run(0.20, 50)],
                      "b": [run(0.25, 16), run(0.21, 16), run(0.23, 16)]})
    assert doc["median"]["a"]["online_s_per_image"] == 0.20 and doc["median"]["b"]["online_s_per_image"] == 0.23
    assert abs(doc["ratio_b_over_a"]["online_s_per_image"] - 1.15) < 1e-12
    assert doc["ratio_b_over_a"]["rounds"] == 16 / 50 and doc["ratio_b_over_a"]["mb_sent_per_image"] == 1.0
