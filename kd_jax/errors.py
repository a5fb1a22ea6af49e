"""The project's own error type: anything a user can cause ends as one line, not a traceback."""


class KdError(Exception):
    """A problem with the user's input (flags, config, data, checkpoints), stated in one line."""
