"""sshuttle's habits against the real test network: 0/0 through an ssh jump host, with -vv.

A second sshd runs on the target T; the client in C reaches it with ProxyJump through S,
from a real ssh config. S, the jump host, is excluded as the server is: otherwise 0/0
captures ssh's own connection to S, and the reconnect after a lost session never arrives.
"""

from __future__ import annotations

import os
import signal

import pytest

from testbed import SYSTEM_PYTHON, T_ADDR, T_ADDR2, Shuttle, sshd
from testbed.config import S_ADDR6_C, S_ADDR_C, T_ADDR6

from .checks import RECONNECTED, assert_page

# T's first address is the ssh server's, excluded: the page comes from its second one.

pytestmark = pytest.mark.integration


def start_target_sshd(shuttle: Shuttle) -> None:
    """sshd on T's addresses, with S's keys and users; stopped with the network's processes."""
    topo = shuttle.topo
    directory = topo.run_dir / "t-ssh"
    directory.mkdir(mode=0o755)
    logins = [user.name for user in topo.users]
    config = sshd.write_config(directory, topo.ssh_dir / "authorized_keys", logins)
    text = config.read_text().replace(S_ADDR6_C, T_ADDR6).replace(S_ADDR_C, T_ADDR)
    config.write_text(text)
    topo.procs.append(sshd.start(topo.t, config, topo.logs / "sshd-t.log"))


def test_zero_zero_through_a_jump_host_excludes_it_and_reconnects(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    start_target_sshd(shuttle)
    config = topo.write_user_file(
        "ssh_config",
        f"""\
Host target
  HostName {T_ADDR}
  ProxyJump {topo.user.name}@{S_ADDR_C}
Host *
  IdentityFile {topo.home().key}
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
""",
    )
    args = shuttle.client_args(subnets=["0/0"], remote_name="target", python=SYSTEM_PYTHON)
    args[args.index("-e") + 1] = f"ssh -F {config}"
    env = topo.user_env([str(shuttle.venv.bin)])
    # -vv: ssh's own debug lines come into the client's log too.
    client = topo.start("client-jump", topo.user_argv([*args, "--keepalive=1", "-vv"], env))
    shuttle.clients.append(client)
    assert client.wait_for_line("shuttle-client: ready", 60), shuttle.outputs()
    assert f"not capturing the ssh jump hosts: {S_ADDR_C}\n" in client.output()
    assert_page(shuttle, T_ADDR2)
    assert "shuttle-client: debug1: " in client.output(), "no ssh -v lines with -vv"
    # The session on T ends; the new ssh must reach S directly, not through the capture.
    sessions = topo.processes_of(topo.t, topo.user, "sshd")
    assert sessions, "no sshd session process in T"
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    assert client.wait_for_line(RECONNECTED, 40), shuttle.outputs()
    assert_page(shuttle, T_ADDR2)
