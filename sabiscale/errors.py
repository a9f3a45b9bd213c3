"""Errors a user fixes: a recipe, an input file, shards, a checkpoint, a command's arguments.

Each message names the file, line or field and what to do. The CLI prints these alone (exit 2);
any other exception is a bug in sabiscale: the CLI says so, saves its traceback to a file to report
and exits 70 (`sabiscale --debug ...` shows the traceback of either). They subclass the built-in
type a caller would catch (ValueError, FileNotFoundError, ...) so library users can keep catching
those.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something in the user's hands is wrong; the message says what and the way out."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the command needs does not exist."""


class AlreadyExists(UserError, FileExistsError):
    """The command would overwrite something the user has; nothing was written."""


class TrainingDiverged(UserError, FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NoSpace(UserError, OSError):
    """A write failed (disk full, quota, permissions); what was there before is kept."""
