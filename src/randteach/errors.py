"""Errors a user can cause: the command line prints their message, without a traceback, and exits 2; and
randteach's own warnings, which it prints as one line."""


class UserError(Exception):
    """Something the user can fix: the message says what was wrong, what was expected and what to do."""


class DataMissingError(UserError, FileNotFoundError):
    """A data set is not where we looked; the message names the places and the fetch command."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, corrupt or not one of ours."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, ending a command as Ctrl-C's KeyboardInterrupt does (the command line exits 143, not 130)."""


class RandteachWarning(UserWarning):
    """Something randteach did that the user should know of (a changed image folder, damaged log lines,
    unreadable images skipped); the command line prints it as "randteach CMD: warning: ..."."""
