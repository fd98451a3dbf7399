"""One error type for user mistakes: the CLI prints it as a single line, never a traceback."""


class CftuneError(Exception):
    """A mistake the user can fix: the message names the file/line/key, the value, what is
    allowed and what to do (STYLE.md §6). Internal invariants use `assert` instead."""
