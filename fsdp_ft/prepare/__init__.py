"""Reproducible preparation of real models and data sets that install from PyPI (see docs/data.md)."""
