"""Errors a user can cause: the command line prints their message on one line, with no traceback."""


class TrainerError(Exception):
    """Base of every error caused by input the user can fix (config, data, checkpoints)."""


class ConfigError(TrainerError, ValueError):
    pass


class CheckpointError(TrainerError):
    pass
