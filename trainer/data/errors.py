"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A problem with the user's data or data settings (not a bug in the trainer).

    Subclasses ValueError so callers that already catch bad-argument errors keep working.
    """
