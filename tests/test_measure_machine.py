"""--threads: parsing, and 'auto' choosing one thread on a busy machine only."""

import pytest
import torch

from lrdaccel.measure import machine as cpu


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_parse_threads():
    assert cpu.parse_threads("auto") == "auto" and cpu.parse_threads("3") == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            cpu.parse_threads(bad)


def test_auto_uses_one_thread_only_when_busy(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu, "load_average", lambda: 0.1)
    assert cpu.set_threads("auto") is None and torch.get_num_threads() == 2
    assert cpu.busy_warning() is None
    monkeypatch.setattr(cpu, "load_average", lambda: 3.0)
    assert "load average 3.00" in cpu.set_threads("auto") and torch.get_num_threads() == 1
    assert "load average 3.00" in cpu.busy_warning()


def test_explicit_threads_are_applied(monkeypatch, restore_threads):
    monkeypatch.setattr(cpu, "load_average", lambda: 3.0)
    assert cpu.set_threads(2) is None and torch.get_num_threads() == 2
    assert cpu.set_threads(None) is None and torch.get_num_threads() == 2
