"""mnr's version (the package's, in pyproject.toml, says the same)."""

__version__ = "0.1.0"
