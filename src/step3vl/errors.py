"""The one exception family for user-facing errors: the CLI prints these as one line, no traceback."""


class Step3VLError(Exception):
    """Bad input, bad config, missing or corrupt artifact: something the user can fix."""
