"""Errors a user can cause and fix: the command line prints them as one line and exits with code 2."""


class SteperError(ValueError):
    """A problem with the user's input (a file, a model, a config, a program), with the fix in its message."""
