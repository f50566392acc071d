"""The errors mnr reports to users. The CLI prints their message and exits non-zero, no traceback.

Each message starts with what is at fault: a file and line, a flag, or a model path.
"""


class MnrError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class DataError(MnrError, ValueError):
    """Bad training or evaluation data (message starts with file:line)."""


class ConfigError(MnrError, ValueError):
    """A bad setting: a flag, a TOML key, a value out of range (message names the flag)."""


class ModelError(MnrError):
    """A model that cannot be found, loaded or saved."""
