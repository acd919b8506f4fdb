"""Formatting shared by the bench and demo reports: numbers, ratios with their spread, the
machine line, Markdown tables."""

from __future__ import annotations

from typing import Mapping


def si(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def ratio_text(spread: Mapping) -> str:
    """'1.23x (1.20-1.25)': median, then min-max over the repeats."""
    return f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def machine_line(results: Mapping) -> str:
    m = results["machine"]
    load = ""
    if "load_average_1m" in m:
        load = f"; load average {m['load_average_1m']:g} at start"
        if "load_average_1m_at_end" in m:
            load += f", {m['load_average_1m_at_end']:g} at end"
    return (f"Machine: {m.get('device_name', m.get('device'))} ({m.get('device')}), {m.get('cpu_count')} CPUs, "
            f"{m.get('torch_threads')} torch threads{load}; torch {m.get('torch')}; lrdaccel "
            f"{results['lrdaccel_version']}; {results['created']}.")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
