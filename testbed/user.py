"""The unprivileged local user that runs shuttle-client, and how to run commands as it."""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Sequence

from testbed.config import USER2_NAME, USER_NAME
from testbed.locks import locked
from testbed.procs import run

# Held while an account is checked and changed: parallel test workers (pytest -n) and
# concurrent runs all call ensure_user at once, and useradd/usermod racing each other fail on
# the lock of /etc/passwd, or one sees the account before the other has set its password.
# Under /run, which only root may write: no other user can plant the file.
ACCOUNTS_LOCK = Path("/run/shuttle-testbed-accounts.lock")


@dataclass(frozen=True)
class LocalUser:
    """A local account: its name, ids, primary group and home."""

    name: str
    uid: int
    gid: int
    group: str
    home: Path

    def argv(self, argv: Sequence[str], env: Mapping[str, str]) -> List[str]:
        """argv run as this user with exactly env (plus HOME, USER, LOGNAME) and no root rights.

        For use after `ip netns exec`: that needs root, setpriv drops it afterwards. The
        environment is cleared, so nothing of root's (XDG_RUNTIME_DIR, proxies) leaks in.
        """
        base = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
            "PATH": "/usr/bin:/bin",
        }
        base.update(env)
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "env",
            "-i",
            *(f"{key}={value}" for key, value in base.items()),
            *argv,
        ]


def ensure_user(name: str = USER_NAME, groups: Sequence[str] = ()) -> LocalUser:
    """Create the user if missing (shell /bin/sh, home under /home, its own group), and make
    it a member of groups (supplementary; added if missing, never removed).

    The account's password is set to '*' (no password can match) rather than useradd's '!':
    with UsePAM no, sshd treats '!' as a locked account and refuses even key logins.
    """
    with locked(ACCOUNTS_LOCK, timeout=120):
        return _ensure_user(name, groups)


def _ensure_user(name: str, groups: Sequence[str]) -> LocalUser:
    try:
        pwd.getpwnam(name)
    except KeyError:
        # Not checked: a concurrent run may have created it meanwhile; getpwnam decides below.
        run(
            [
                "useradd",
                "--create-home",
                "--home-dir",
                f"/home/{name}",
                "--shell",
                "/bin/sh",
                "--user-group",
                "--comment",
                "shuttle integration tests",
                name,
            ],
            timeout=30,
        )
    if _password_field(name).startswith("!"):
        run(["usermod", "--password", "*", name], timeout=30, check=True)
    missing = [group for group in groups if name not in grp.getgrnam(group).gr_mem]
    if missing:
        run(["usermod", "--append", "--groups", ",".join(missing), name], timeout=30, check=True)
    entry = pwd.getpwnam(name)
    return LocalUser(
        name=name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        group=grp.getgrgid(entry.pw_gid).gr_name,
        home=Path(entry.pw_dir),
    )


def _password_field(name: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > 1:
            return fields[1]
    return ""


def ensure_second_user(first: LocalUser) -> LocalUser:
    """The second local user, a member of the first one's group.

    shuttle-firewalld of a test network admits the first user's group, so the second user may
    open its own sessions too; scoping keeps each session to its own uid's traffic.
    """
    return ensure_user(USER2_NAME, groups=[first.group])
