"""Rank optimization (being built)."""


def optimize_ranks(*args, **kwargs):
    raise NotImplementedError("optimize_ranks is being built")
