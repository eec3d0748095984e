"""Expected failures: the CLI turns these into one line on stderr and exit code 2."""

import re

_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


class UserError(Exception):
    """Bad input from the user (arguments, paths, data). The message is shown as is.

    Library messages name a parameter in backquotes (`batch_size`); the CLI shows it as the option
    it maps to (--batch-size), see `as_options`."""


def as_options(message: str) -> str:
    """A library message in CLI words: each `parameter` becomes --parameter (underscores to dashes)."""
    return _PARAMETER.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def printable(text: str) -> str:
    """`text` safe for a terminal and for one line: control characters (escape sequences or a newline
    in a hostile member name, key or metadata string) shown as escapes, not sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
