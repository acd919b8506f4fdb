"""The package version, in one place: the package __init__, saved plans and results read it from here."""

__version__ = "0.4.0"
