"""The errors a user can act on, shared by every package; `cli.py` prints them as one `error:` line, without a
traceback. Each message names the file or config key and what to do next.
"""


class MedselError(Exception):
    """Base of every error that is the user's to fix (config, data, sweep state)."""


class ConfigError(MedselError, ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


class DataError(MedselError, ValueError):
    """Input data that cannot be used as given; the message names the files and what to do about them."""


class SweepError(MedselError, RuntimeError):
    """A sweep that cannot go on (e.g. no trial of a stage finished)."""
