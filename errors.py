"""The errors a person running a command can fix: each is shown as one line (exit code 2 on the
command line, a 4xx JSON error on the web). Torch-free."""


class UserError(Exception):
    """Bad input from the person running a command: shown as one line, exit code 2."""


class ImageError(UserError):
    """An image that cannot be decoded safely."""


class CheckpointError(UserError):
    """A model file that cannot be loaded."""
