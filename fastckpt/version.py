"""The package version (one place: the root package and convert's metadata read it)."""

__version__ = "0.1.0"
