"""The one error type the CLI shows to a user as a message rather than a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, paths): the message names the file, line or key."""
