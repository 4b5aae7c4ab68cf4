"""One error type for bad input, so every command can print it as a single line.

Commands wrap their work in :func:`traces.common.cli.run_cli`, which turns a ``TideError``
into ``error: <message>`` on stderr and exit status 2, with no traceback.
"""
from __future__ import annotations


class TideError(ValueError):
    """Bad input a user can fix: a file, a flag or a value. The message names it."""
