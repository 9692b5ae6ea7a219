"""threengan: 3N-GAN semi-supervised X-ray classification from the command line."""

# A literal, not importlib.metadata: reading package metadata costs ~70 ms at every start.
# pyproject.toml reads the version from here.
__version__ = "0.2.0"
