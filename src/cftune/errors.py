"""One error type for user mistakes: the CLI prints it as a single line, never a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class CftuneError(Exception):
    """A mistake the user can fix: the message names the file/line/key, the value, what is
    allowed and what to do. Internal invariants use `assert` instead."""


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """"; did you mean X?" for the closest allowed value (difflib), or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
