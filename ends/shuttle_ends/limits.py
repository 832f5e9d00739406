"""The open-file limit, which both ends raise at start (the client imports this too).

Every relayed TCP connection holds one socket on each side, so the common default soft
limit of 1,024 would cap a session at about a thousand connections. The hard limit is
what the administrator allows; raising the soft limit up to it needs no privilege.
"""

import resource


def raise_open_files() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # An infinite hard limit still cannot go past the kernel's nr_open: stay finite.
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # keep the soft limit we have; connections beyond it are refused
    return soft
