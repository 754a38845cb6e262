"""Bad input is reported as one line that names the value, never as a traceback."""
from __future__ import annotations

import difflib


class ThawlabError(ValueError):
    """A user error: wrong config value, missing file, unreachable hub. Printed as one line, exit 2."""


def did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""
