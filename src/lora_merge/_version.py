"""The installed package's version, from its metadata (never hard-coded)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lora-merge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
