"""The package version (``pyproject.toml``'s ``version``; ``tests/test_architecture.py`` holds the two equal).

A module of its own so that ``results.stamp`` can name it without importing the package root, which imports
from every room (ARCHITECTURE.md)."""

__version__ = "0.1.0"
