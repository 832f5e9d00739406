"""The one exception a request handler raises on purpose: it becomes the caller's ErrorAnswer."""


class RequestError(Exception):
    """The request was refused or could not be carried out; str() is the text for the caller.

    Anything else a handler raises is firewalld's own bug, answered as an internal error.
    """


class StartupError(Exception):
    """firewalld cannot start; str() is the one line for whoever started it."""
