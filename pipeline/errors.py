"""Expected failures: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user (arguments, paths, data). The message is shown as is."""
