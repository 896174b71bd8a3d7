"""The one base class for failures a user can fix from the message alone."""


class StageError(Exception):
    """Reported as `error: <message>` with a non-zero exit, without a traceback."""
