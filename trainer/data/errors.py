"""The one exception type of the data pipeline."""

from trainer.errors import TrainerError


class DataError(TrainerError, ValueError):
    """A problem with the user's data or data settings (not a bug in the trainer).

    A TrainerError so the command line prints it without a traceback; a ValueError so callers
    that already catch bad-argument errors keep working.
    """
