"""The one exception type the plugin raises for bad input.

Anything a user can fix (a flag, a path, a metadata key) is raised as `UserInputError` with a one-line message
that names the fix; the entry points print that line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input that the user can correct; the message is one line and says what to change."""
