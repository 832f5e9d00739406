"""Where a running shuttle-client's control sockets are: one place for the client that binds
them and for the scripts and `shuttle-client ctl` that connect. Pure: nothing is created."""

import os

SOCKET_NAME = "control.sock"
EVENTS_SUFFIX = ".events"


def default_control_path() -> str:
    """$XDG_RUNTIME_DIR/shuttle/control.sock, the per-user runtime directory the session
    manager makes (mode 0700, removed at logout); without one, /tmp/shuttle-<uid>/."""
    # An empty XDG_RUNTIME_DIR is as good as unset (the XDG spec: only absolute paths count).
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "shuttle", SOCKET_NAME)
    # /tmp is shared: the directory is per uid, and ZAP refuses other uids anyway.
    return os.path.join("/tmp", f"shuttle-{os.getuid()}", SOCKET_NAME)  # noqa: S108


def events_path(path: str) -> str:
    """The events (PUB) socket beside the request socket at path."""
    return path + EVENTS_SUFFIX
