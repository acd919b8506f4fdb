"""The demo's stage clock: wall and CPU seconds per stage, numbered in running order, with parts."""

import json

from lrdaccel.bench import demo_stages
from lrdaccel.bench.demo_stages import Stages


class FakeClocks:
    """perf_counter and process_time that advance only when told: a stage that waits on the
    machine (wall 10 s, CPU 1 s) and one that computes (wall 4 s, CPU 4 s)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def advance(self, wall, cpu):
        self.wall += wall
        self.cpu += cpu


def test_stages_record_wall_cpu_parts_and_order(monkeypatch, capsys):
    clocks = FakeClocks()
    monkeypatch.setattr(demo_stages.time, "perf_counter", lambda: clocks.wall)
    monkeypatch.setattr(demo_stages.time, "process_time", lambda: clocks.cpu)
    stages = Stages(verbose=True)
    names = ["zeta waits", "alpha computes"] + [f"stage {i}" for i in range(3, 10)]
    assert stages.run(names[0], lambda: clocks.advance(10, 1) or "result") == "result"
    stages.run(names[1], lambda: clocks.advance(4, 4))
    for name in names[2:]:
        stages.run(name, lambda: None)
    stages.part("zeta waits", "training", 7.5)
    stages.part("zeta waits", "the rest", stages.seconds("zeta waits") - 7.5)
    clocks.advance(0.5, 0.25)  # between stages: saving, counting
    record = stages.record()

    assert record["stages"]["1. zeta waits"] == 10 and record["stage_cpu_seconds"]["1. zeta waits"] == 1
    assert record["stages"]["2. alpha computes"] == 4 and record["stage_cpu_seconds"]["2. alpha computes"] == 4
    assert record["stage_parts"] == {"1. zeta waits": [["training", 7.5], ["the rest", 2.5]]}
    assert record["total_seconds"] == {"wall": 14.5, "cpu": 5.25}
    # results files are written with sorted keys: the numbers keep the running order
    reloaded = json.loads(json.dumps(record, sort_keys=True))
    assert [key.split(". ", 1)[1] for key in reloaded["stages"]] == names
    assert capsys.readouterr().out.splitlines()[:2] == ["==> 1. zeta waits", "==> 2. alpha computes"]
