"""Interleaved timing: the call order, the phase means and the ratio arithmetic."""

import statistics

import pytest

from lrdaccel.measure.timer import Phase, Timings, Workload, measure_interleaved, ratio_to_baseline, spread


def test_spread():
    assert spread([3, 1, 2]) == {"min": 1.0, "median": 2.0, "max": 3.0, "values": [3.0, 1.0, 2.0]}
    with pytest.raises(ValueError, match="at least one"):
        spread([])


def test_ratio_is_taken_within_each_repeat():
    timings = Timings(seconds={"original": [2.0, 4.0, 3.0], "fast": [1.0, 2.0, 2.0]})
    ratio = ratio_to_baseline(timings, "fast", "original")
    assert ratio["values"] == [2.0, 2.0, 1.5]
    assert (ratio["min"], ratio["median"], ratio["max"]) == (1.5, 2.0, 2.0)


def _logging_workloads(log):
    def step(tag):
        return lambda: log.append(tag)

    def prepare(tag):
        return lambda: log.append("prepare " + tag)

    return [
        Workload("A", [Phase(step("A"))]),
        Workload("B", [Phase(step("B0"), prepare("B0")), Phase(step("B1"), prepare("B1"))]),
    ]


def test_workloads_are_interleaved_after_warmup():
    log = []
    timings = measure_interleaved(_logging_workloads(log), repeats=3, warmup=2, min_run_time=0.0)
    # warm-up: exactly `warmup` calls of each phase, after its prepare
    assert log[:8] == ["A", "A", "prepare B0", "B0", "B0", "prepare B1", "B1", "B1"]
    # then A B A B ...: each phase measured right after its prepare, in order, once per repeat
    runs = [tag for i, tag in enumerate(log[8:]) if i == 0 or log[8 + i - 1] != tag]
    assert runs == ["A", "prepare B0", "B0", "prepare B1", "B1"] * 3
    assert len(timings.seconds["A"]) == len(timings.seconds["B"]) == 3
    assert [len(p) for p in timings.per_phase["B"]] == [2, 2, 2]
    for mean, phases in zip(timings.seconds["B"], timings.per_phase["B"]):
        assert mean == pytest.approx(statistics.fmean(phases))


def test_fast_steps_are_repeated_within_a_measurement():
    log = []
    measure_interleaved([Workload("A", [Phase(lambda: log.append(1))])], repeats=2, warmup=1, min_run_time=0.01)
    assert len(log) > 3  # a no-op takes far less than 10 ms: each measurement repeats it


@pytest.mark.parametrize("kwargs, message", [
    ({"repeats": 0}, "repeats"),
    ({"warmup": -1}, "warmup"),
    ({"repeats": 1.5}, "repeats"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_interleaved([Workload("A", [Phase(lambda: None)])], **kwargs)


def test_duplicate_and_empty_workloads():
    with pytest.raises(ValueError, match="unique"):
        measure_interleaved([Workload("A", [Phase(lambda: None)]), Workload("A", [Phase(lambda: None)])])
    with pytest.raises(ValueError, match="no phases"):
        Workload("A", [])
