"""The one kind of error that is the user's to fix.

A `UserError` is about what the user gave (a setting, a file, a row, a folder) and its
message says what and how to fix it; `grpo` prints it in one line and exits 2. Every other
exception is a bug of ours or of a library and keeps its traceback, so it can be reported.
"""

from __future__ import annotations


class UserError(ValueError):
    """Raised for input the user can correct; a ValueError so callers that catch those still do."""
