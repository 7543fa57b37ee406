"""The one exception type the scripts turn into a one-line message."""


class UserError(Exception):
    """Bad input: the message names the file or flag and what to do about it."""
