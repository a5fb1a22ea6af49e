"""The project's own error type: anything a user can cause ends as one line, not a traceback."""


class KdError(Exception):
    """A problem with the user's input (flags, config, data, checkpoints), stated in one line."""


class Interrupted(KdError):
    """The run was asked to stop (SIGTERM, Ctrl-C) and saved a checkpoint to resume from."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"
