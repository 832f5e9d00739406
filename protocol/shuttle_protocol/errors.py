"""The protocol's two kinds of error: ours and the peer's (as h11 splits them)."""


class ProtocolError(Exception):
    """Something broke the protocol; the session or channel it concerns is over."""


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol forbids: a bug or a local misuse."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message the protocol forbids: bad input, never our bug."""
