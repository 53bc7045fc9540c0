"""crossvit-serve: the HTTP service around the CrossViT model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crossvit-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
