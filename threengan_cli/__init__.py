"""threengan: 3N-GAN semi-supervised X-ray classification from the command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("threengan")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
