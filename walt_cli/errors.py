"""User-facing errors.

Library code raises :class:`WaltError` for problems the user can fix (a bad recipe, an unreadable
file, a shape that the model cannot take). The CLI prints its message as one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""


class WaltError(ValueError):
    """A problem with the user's input, stated in one line."""
