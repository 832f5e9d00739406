"""The servers on the target host: an HTTP page with a unique marker, TCP echo and bulk servers,
a UDP echo server, and a nameserver (dnsmasq) that alone knows one name."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import List, Sequence

from testbed.config import (
    BULK_PORT,
    DNS_ANSWER,
    DNS_ANSWER6,
    DNS_NAME,
    ECHO_PORT,
    HTTP_PORT,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR6,
    UDP_ECHO_PORT,
)
from testbed.netns import Namespace
from testbed.procs import Proc

TCPTOOL = Path(__file__).with_name("tcptool.py")

PAGE = """<!DOCTYPE html>
<html><head><title>shuttle testbed</title></head>
<body><p>This page is served on the target host, behind the ssh server.</p>
<p>{marker}</p></body></html>
"""


def install_tcptool(directory: Path) -> Path:
    """Copy tcptool.py where every user can read it (the repository may not be traversable)."""
    directory.mkdir(mode=0o755, exist_ok=True)
    target = directory / TCPTOOL.name
    shutil.copyfile(TCPTOOL, target)
    target.chmod(0o644)
    return target


def write_page(directory: Path) -> str:
    """Write index.html with a fresh marker into directory; return the marker."""
    directory.mkdir(mode=0o755, exist_ok=True)
    marker = f"shuttle-testbed-marker-{uuid.uuid4().hex}"
    page = directory / "index.html"
    page.write_text(PAGE.format(marker=marker))
    page.chmod(0o644)
    return marker


# The servers listen on every address of the target namespace (which has only its own
# addresses), of both families, so a second address can serve exclude tests. http.server
# binds "::" as a dual-stack socket; tcptool takes a comma-separated list of addresses.
ANY6 = "::"
ANY_BOTH = "0.0.0.0,::"


DNS_PORT = 53
DNS_LOG = "dns.log"


def dnsmasq_argv(listen: Sequence[str] = (T_ADDR, T_ADDR6)) -> List[str]:
    """A nameserver on these addresses (T's first ones) that answers DNS_NAME and nothing
    else, logging every query (with its source) to stderr."""
    return [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--pid-file=",
        "--bind-interfaces",
        f"--listen-address={','.join(listen)}",
        f"--address=/{DNS_NAME}/{DNS_ANSWER}",
        f"--address=/{DNS_NAME}/{DNS_ANSWER6}",
        "--log-queries",
        "--log-facility=-",
    ]


def start(ns: Namespace, www: Path, tcptool: Path, logs: Path) -> List[Proc]:
    """Start the five servers in ns, listening on all of its addresses (IPv4 and IPv6);
    wait until they do."""
    procs = [
        ns.start(
            "http",
            [SYSTEM_PYTHON, "-m", "http.server", str(HTTP_PORT), "--bind", ANY6],
            logs / "http.log",
            cwd=www,
        ),
        ns.start(
            "echo",
            [SYSTEM_PYTHON, str(tcptool), "serve", "echo", ANY_BOTH, str(ECHO_PORT)],
            logs / "echo.log",
        ),
        ns.start(
            "bulk",
            [SYSTEM_PYTHON, str(tcptool), "serve", "bulk", ANY_BOTH, str(BULK_PORT)],
            logs / "bulk.log",
        ),
        ns.start(
            "udp-echo",
            [SYSTEM_PYTHON, str(tcptool), "serve", "udp-echo", ANY_BOTH, str(UDP_ECHO_PORT)],
            logs / "udp-echo.log",
        ),
        ns.start("dns", dnsmasq_argv(), logs / DNS_LOG),
    ]
    # http.server: one dual-stack socket; tcptool: one socket per family.
    ports = (
        (HTTP_PORT, 1, False),
        (ECHO_PORT, 2, False),
        (BULK_PORT, 2, False),
        (UDP_ECHO_PORT, 2, True),
        (DNS_PORT, 2, True),
    )
    for proc, (port, count, udp) in zip(procs, ports):
        if not ns.wait_listening(port, timeout=15, count=count, udp=udp):
            details = "\n".join(p.describe() for p in procs)
            for p in procs:
                p.stop()
            what = "UDP port" if udp else "port"
            raise RuntimeError(f"{proc.name} server did not listen on {what} {port}\n{details}")
    return procs
