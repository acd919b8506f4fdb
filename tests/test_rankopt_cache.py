"""The timing cache: reuse across runs, keys that separate what changes a time, safe files."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel.rankopt import TimingCache, default_cache_path
from lrdaccel.measure.machine import device_name


class CountingTimer:
    def __init__(self, sleep_s: float = 0.0):
        self.calls, self.sleep_s = 0, sleep_s

    def __call__(self, job) -> float:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        rank = job.rank if job.rank is None or isinstance(job.rank, int) else job.rank[0]
        return 50.0 if rank is None else (10.0 if rank <= 48 else 13.0)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 4 * 4, 100))


def run(model, path, timer, **kwargs):
    x = torch.randn(2, 16, 4, 4)
    return lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0), x, timer=timer, cache=path, **kwargs)


def test_second_run_measures_nothing_and_chooses_the_same(tmp_path):
    model, path = small_cnn(), tmp_path / "timings.json"
    first_timer, second_timer = CountingTimer(), CountingTimer()
    first = run(model, path, first_timer)
    second = run(model, path, second_timer)
    assert first_timer.calls > 0 and second_timer.calls == 0
    assert second.meta["rank_optimization"]["timed"] == 0
    assert second.meta["rank_optimization"]["cache_hits"] == first_timer.calls
    assert [(r.kind, r.rank, r.time_ms) for r in first] == [(r.kind, r.rank, r.time_ms) for r in second]


def test_rerun_under_a_budget_stops_where_the_first_run_did(tmp_path):
    model, path = small_cnn(), tmp_path / "timings.json"
    first_timer, second_timer = CountingTimer(sleep_s=0.01), CountingTimer()
    first = run(model, path, first_timer, budget_s=0.05)
    second = run(model, path, second_timer, budget_s=0.05)
    assert second_timer.calls == 0
    assert [r.rank for r in first] == [r.rank for r in second]


def test_objective_dtype_and_input_shape_are_part_of_the_key(tmp_path):
    model, path = small_cnn(), tmp_path / "timings.json"
    run(model, path, CountingTimer())
    for kwargs in ({"objective": "train"}, {"dtype": torch.float64}):
        timer = CountingTimer()
        run(model, path, timer, **kwargs)
        assert timer.calls > 0, kwargs
    timer = CountingTimer()
    lrd.optimize_ranks(model, lrd.plan(model, ratio=2.0), torch.randn(3, 16, 4, 4), timer=timer, cache=path)
    assert timer.calls > 0


def test_file_is_versioned_json_and_keys_name_device_and_rank(tmp_path):
    model, path = small_cnn(), tmp_path / "timings.json"
    run(model, path, CountingTimer())
    data = json.loads(path.read_text())
    assert data["format"] == "lrdaccel.timings" and data["version"] == 1
    keys = list(data["entries"])
    assert all(key.startswith(device_name("cpu") + f"|torch {torch.__version__}|float32|runtime eager|infer|")
               for key in keys)
    assert any(key.endswith("|original") for key in keys) and any("|rank " in key for key in keys)
    assert not list(tmp_path.glob(".timings-*"))  # no temp file left behind


def test_disabled_cache_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run(small_cnn(), False, CountingTimer())
    assert not (tmp_path / "lrdaccel").exists()


def test_default_location_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "lrdaccel" / "timings.json"
    run(small_cnn(), None, CountingTimer())
    assert (tmp_path / "lrdaccel" / "timings.json").exists()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "lrdaccel" / "timings.json"


def test_saves_merge_with_what_another_process_wrote(tmp_path):
    path = tmp_path / "timings.json"
    a, b = TimingCache(path), TimingCache(path)
    a.put("key-a", 1.0, 0.1)
    a.save()
    b.put("key-b", 2.0, 0.2)
    b.save()
    merged = TimingCache(path)
    assert merged.get("key-a").ms == 1.0 and merged.get("key-b").ms == 2.0


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read it as JSON"),
    ('{"format": "something-else"}', "not an lrdaccel timing cache"),
    ('{"format": "lrdaccel.timings", "version": 99, "entries": {}}', "upgrade lrdaccel"),
    ('{"format": "lrdaccel.timings", "version": 1, "entries": {"k": {"ms": "x"}}}', "malformed"),
    # 0.3.x read these as 5 ms and 1 ms
    ('{"format": "lrdaccel.timings", "version": 1, "entries": {"k": {"ms": "5", "cost_s": 0.1}}}', "malformed"),
    ('{"format": "lrdaccel.timings", "version": 1, "entries": {"k": {"ms": true, "cost_s": 0.1}}}', "malformed"),
    ('{"format": "lrdaccel.timings", "version": 1, "entries": [1, 2]}', "\"entries\" must be an object, got list"),
])
def test_a_file_that_is_not_ours_is_a_clear_error_and_left_alone(tmp_path, content, message):
    path = tmp_path / "timings.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        run(small_cnn(), path, CountingTimer())
    assert str(path) in str(error.value)
    assert path.read_text() == content


@pytest.mark.parametrize("bad_ms", [-5.0, 0.0, float("nan"), float("inf")])
def test_entries_with_an_impossible_time_are_dropped_with_one_warning_and_timed_again(tmp_path, bad_ms):
    model, path = small_cnn(), tmp_path / "timings.json"
    first = run(model, path, CountingTimer())
    data = json.loads(path.read_text())
    broken = sorted(key for key in data["entries"] if "|rank " in key)[:3]
    for key in broken:
        data["entries"][key]["ms"] = bad_ms  # json writes NaN / Infinity, which json reads back
    path.write_text(json.dumps(data))
    timer = CountingTimer()
    with pytest.warns(UserWarning) as caught:
        second = run(model, path, timer)
    messages = [str(w.message) for w in caught if "timing cache" in str(w.message)]
    assert messages == [f"timing cache {path}: dropped 3 entries whose time is not a positive finite number; "
                        f"they will be timed again"]
    assert timer.calls == 3  # exactly the dropped entries, measured again
    assert [(r.rank, r.time_ms) for r in second] == [(r.rank, r.time_ms) for r in first]
    healed = json.loads(path.read_text())["entries"]
    assert all(healed[key]["ms"] > 0 for key in broken)
