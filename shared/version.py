"""The package's version, as installed (pyproject.toml defines it once)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("pagedserve")
except PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
