"""benchmarks/suite.py's per-round ratios pair a round with the same round, and only with it.

No benchmark runs here: ``per_step`` is driven by a stand-in session that answers with fixed
times, and ``round_ratio`` reads hand-written results and the recorded JSON files.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a package at the repository root, not installed with marquardt: plain `pytest`
# (unlike `python -m pytest` from the root) does not put the root on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.suite import OURS_FIT, PEER_CHOL, per_step, round_ratio  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class FixedTimesSession:
    """Stands in for ``suite.Session``: each call returns a fixed time, or fails like a timeout.

    ``times[name][r]`` is worker ``name``'s median step (or the bound's total) in round ``r``;
    ``None`` makes that call fail.
    """

    case = "T2"

    def __init__(self, times: dict[str, list[float | None]]) -> None:
        self.times = times
        self.failures: list[dict] = []
        self.bound_calls = 0

    def available(self, contender) -> bool:
        return True

    def call(self, name: str, func: str, timeout: float = 600.0, **kwargs):
        if func == "bound":  # the bound's call has no seed: its rounds are counted
            r, self.bound_calls = self.bound_calls, self.bound_calls + 1
        else:
            r = kwargs["seed"]  # per_step seeds each run with its round
        seconds = self.times[name][r]
        if seconds is None:
            self.failures.append({"module": name, "func": func, "kwargs": kwargs,
                                  "error": "timed out", "peak_rss_mb": None})
            return None
        if func == "bound":
            return {"syrk_s": seconds / 2, "chol_s": seconds / 2, "total_s": seconds,
                    "syrk_gflops": 1.0, "chol_gflops": 1.0}
        return {"times": [seconds] * 3, "mse": 0.0}


def run_rounds(times: dict[str, list[float | None]]) -> dict:
    return per_step(FixedTimesSession(times), [OURS_FIT, PEER_CHOL], rounds=3, steps=3, warmup=0,
                    bound_repeats=1, cap_s=60.0)


# ours' times double each round, so pairing the peer's round 2 with ours' round 1 shows.
OURS = [1.0, 2.0, 4.0]
BOUND = [0.5, 1.0, 2.0]


def test_round_ratio_pairs_a_contender_missing_a_round_by_round_index():
    result = {"contenders": {"ours (fit)": {"rounds": [{"round": r, "seconds": t} for r, t in enumerate(OURS)]},
                             "peer (cholesky)": {"rounds": [{"round": 0, "seconds": 2.0},
                                                            {"round": 2, "seconds": 8.0}]}},
              "bound": {"rounds": [{"round": r, "seconds": t} for r, t in enumerate(BOUND)]}}
    # Round 0 with round 0 (2/1) and round 2 with round 2 (8/4); round 1 only ours ran.
    assert round_ratio(result, "peer (cholesky)", "ours (fit)") == 2.0
    assert round_ratio(result, "ours (fit)", "peer (cholesky)") == 0.5
    assert round_ratio(result, "peer (cholesky)", "bound") == 4.0


def test_per_step_keeps_the_round_of_a_contender_that_missed_one():
    ps = run_rounds({"ours": OURS, "peer": [2.0, None, 8.0], "bound": BOUND})
    assert round_ratio(ps, "peer (cholesky)", "ours (fit)") == 2.0  # 3.0 if paired by position
    assert round_ratio(ps, "peer (cholesky)", "bound") == 4.0  # 6.0 if paired by position
    assert round_ratio(ps, "ours (fit)", "bound") == 2.0
    peer = ps["contenders"]["peer (cholesky)"]
    assert peer["rounds"] == [{"round": 0, "seconds": 2.0}, {"round": 2, "seconds": 8.0}]
    assert [run["round"] for run in peer["runs"]] == [0, 2]
    assert peer["errors"] == ["timed out"]


def test_per_step_keeps_the_round_of_a_bound_that_missed_one():
    ps = run_rounds({"ours": OURS, "peer": [2.0, 4.0, 8.0], "bound": [0.5, None, 2.0]})
    assert round_ratio(ps, "ours (fit)", "bound") == 2.0  # 1.5 if paired by position
    assert ps["bound"]["rounds"] == [{"round": 0, "seconds": 0.5}, {"round": 2, "seconds": 2.0}]
    assert ps["bound"]["total_s"] == 1.25


def test_round_ratio_is_nan_without_a_common_round():
    result = {"contenders": {"ours (fit)": {"rounds": [{"round": 0, "seconds": 1.0}]},
                             "peer (cholesky)": {"rounds": [{"round": 1, "seconds": 2.0}]}},
              "bound": {}}
    assert math.isnan(round_ratio(result, "peer (cholesky)", "ours (fit)"))
    assert math.isnan(round_ratio(result, "ours (fit)", "bound"))
    assert math.isnan(round_ratio(result, "absent", "ours (fit)"))


@pytest.mark.parametrize("case", ["T1", "T2", "T3", "T5"])
def test_recorded_positional_rounds_read_as_before(case):
    # Results written before rounds carried their index hold bare times, one per round from 0,
    # and every contender there completed every round: the ratios are those of pairing by position.
    ps = json.loads((RESULTS / f"{case}.json").read_text())["per_step"]
    rounds = {label: entry["rounds"] for label, entry in ps["contenders"].items()}
    rounds["bound"] = ps["bound"]["rounds"]
    if not all(isinstance(t, float) for times in rounds.values() for t in times):
        pytest.skip(f"{case}.json was written with round indices")
    for num in rounds:
        for den in rounds:
            if num != den:
                by_position = [a / b for a, b in zip(rounds[num], rounds[den])]
                assert round_ratio(ps, num, den) == statistics.median(by_position), (num, den)
