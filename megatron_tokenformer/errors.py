"""The one base class for errors that are the user's to fix.

A `UserError` names the problem and the fix (which config key, which file); the launch scripts
and tools print it as one line and exit with code 2, never with a traceback. Each module raises
its own subclass (ConfigError, DataError, CheckpointError, ...) so a caller can still tell them
apart.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user must resolve; printed as `error: <message>`, exit code 2."""
