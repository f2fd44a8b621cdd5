"""The user-facing error type.

Anything a user can cause (a bad file, a bad config key, a missing checkpoint) raises
:class:`MedmimError` with a message that names the file or setting. The CLI prints the
message on one line and exits with status 2. Internal bugs raise anything else.
"""

from __future__ import annotations


class MedmimError(Exception):
    """A problem with the user's input: the message names the offending file or setting."""

    exit_code = 2

    def __init__(self, message: str):
        # one line, always: the CLI prints it as is
        super().__init__(" ".join(str(message).split()))
