"""llmq's version, read once from the installed package metadata (pyproject.toml is the single source).

A module of its own so that everything that records the version (config.json, report.json, the results store,
exported configs) can import it without importing the package root, which loads the whole pipeline.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmq")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
