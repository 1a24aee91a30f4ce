"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix: a config key, a data file, a model path, a checkpoint.

    The message must name the offending key, file or row and say what to do.
    """


class ConfigError(UserError):
    """An invalid config file or override."""


class DataError(UserError):
    """A data file that is missing, empty or does not match the task's schema."""


class CheckpointError(UserError):
    """A resume or export path that is not a usable checkpoint."""
