"""The one error type the CLI shows to a user as a message rather than a traceback."""

import contextlib


class UserError(Exception):
    """Bad input from the user (config, data, paths): the message names the file, line or key."""


@contextlib.contextmanager
def located(where: str):
    """A context whose UserErrors are prefixed with ``where`` (file:line, or the record they concern)."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
