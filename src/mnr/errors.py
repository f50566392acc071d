"""The errors mnr reports to users. The CLI prints their message and exits non-zero, no traceback.

Each message starts with what is at fault: a file and line, a flag, a model path or a step.
"""


class MnrError(Exception):
    """Base of every error caused by the user's input or the machine, rather than by a bug."""

    exit_code = 2


class DataError(MnrError, ValueError):
    """Bad training or evaluation data (message starts with file:line)."""


class ConfigError(MnrError, ValueError):
    """A bad setting: a flag, a TOML key, a value out of range (message names the flag)."""


class ModelError(MnrError):
    """A model that cannot be found, loaded or saved."""


class CheckpointError(MnrError):
    """A checkpoint cannot be written or read, or does not fit the run that wants to resume it."""


class TrainingError(MnrError):
    """Training cannot go on (a non-finite loss)."""


class Stopped(MnrError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint: not a failure, nothing is lost.

    ``exit_code`` is 128 + the signal number, as a shell reports a process ended by that signal.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
