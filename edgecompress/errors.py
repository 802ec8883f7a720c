"""The one exception type users see: a bad input that the CLI turns into one line and exit code 2."""


class UserError(Exception):
    """A problem with what the user gave us (spec, recipe, file, data), not a bug in edgecompress."""
