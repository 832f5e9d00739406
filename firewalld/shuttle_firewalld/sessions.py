"""Open sessions: who owns each, what it captures, and when its lease runs out.

Every check that depends on the caller rather than on the message's form is made here:
the method works here, the scope policy allows the request, the redirect port is the
caller's, the caller has not too many sessions, a reply socket lies inside its session and
answers a program of a user the session captures, a shortcut lies inside its session and
leads into a port of the caller's, the caller may write host names, the caller may see a
session.

Two threads use it (server.py): the loop serves quick requests under `lock`; the worker
thread applies, updates and removes rules, and takes `lock` only to change what the loop
reads (the open sessions, a session's targets, the tokens), never while a tool runs.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from typing import Protocol, TypeVar

from shuttle_protocol.firewall_messages import (
    MAX_SESSIONS,
    MAX_SUBNETS,
    SHORTCUT_METHODS,
    OpenSessionRequest,
    SessionEntry,
)
from shuttle_protocol.firewall_messages import Shortcut as WireShortcut
from shuttle_protocol.firewall_messages import Target as WireTarget

from .bypass import free_mark
from .errors import RequestError
from .exits import Exits, ProcessGone
from .handover import Grants
from .hosts_file import HostsFile
from .methods.base import Method
from .methods.choice import choose
from .netns import Namespaces
from .policy import DEFAULT_PATH, Policy
from .ports import Listener, port_problem, program_problem, sockets_on, udp_sockets
from .prepared import Prepared, Targets, covers, releasable, versions_of
from .session import Session, Shortcut
from .sockdiag import SockDiagError
from .targets import DNS_PORT, LOOPBACK, Address, Target
from .transparent import Flow, reply_problem, show

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_SESSIONS_PER_UID = 16
# What one uid's sessions may ask for the hosts file together (root: no limit): every
# user's lookups read the file whole, at each lookup. Entries and bytes as asked, skipped
# ones included; one full SetHosts of short names fits.
MAX_HOSTS_PER_UID = 10_000
MAX_HOSTS_BYTES_PER_UID = 1024 * 1024
# Subnets and excludes of one member's sessions together: one session as big as the protocol
# allows. Each target costs firewalld memory while its session lives (docs/firewalld.md,
# "Limits"), and sixteen such sessions would cost sixteen times that.
MAX_TARGETS_PER_UID = 2 * MAX_SUBNETS
FREE_CHUNK = 1000  # targets freed at once (free_in_pieces): about a millisecond's work


class Fence(Protocol):
    """What makes reply sockets (the tproxy method): each fenced to answer one flow only."""

    def reply_socket(self, session: Session, flow: Flow) -> socket.socket:
        """A reply socket for the flow, which is in session.flows from now on; RequestError
        if no reply may come from there."""
        ...

    def forget_flows(self, session: Session, flows: Collection[Flow]) -> None:
        """Take these flows out of session.flows: their reply sockets send nothing more."""
        ...


class Sessions:
    """The registry of open sessions, and the only place that applies or removes them."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        lease: float,
        *,
        policy: Policy | None = None,
        listeners_of_port: Callable[[int], list[Listener]] = sockets_on,
        clock: Callable[[], float] = time.monotonic,
        fd_path: str = "",
        fence: Fence | None = None,
        udp_sockets_now: Callable[[], list[Listener]] = udp_sockets,
        hosts: HostsFile | None = None,
        on_change: Callable[[int], None] = lambda count: None,
        exits: Exits | None = None,
    ) -> None:
        """methods: every method this firewalld has (see disable); fd_path: the fd socket,
        where tokens are redeemed (server.FdServer listens there); on_change: told the
        number of open sessions whenever one opens or closes; fence: makes the reply sockets
        of tproxy sessions (None: there are none); udp_sockets_now: every UDP socket here;
        exits: the watch on the processes that opened sessions (its fileno() belongs in the
        daemon's poller)."""
        self.lease = lease
        self.lock = threading.Lock()
        self.grants = Grants(fd_path, clock)
        self._fence = fence
        self._udp_sockets = udp_sockets_now
        self._methods = methods
        self._policy = policy if policy is not None else Policy(DEFAULT_PATH)
        self._broken: dict[str, str] = {}
        self._listeners_of_port = listeners_of_port
        self._clock = clock
        self._open: dict[str, Session] = {}
        self._hosts = hosts if hosts is not None else HostsFile()
        self._with_hosts: set[str] = set()  # ids of sessions that may have a hosts block
        self._on_change = on_change
        self.exits = exits if exits is not None else Exits()
        self.namespaces = Namespaces()

    def __len__(self) -> int:
        return len(self._open)

    def disable(self, method: str, why: str) -> None:
        """The method does not work here: asking for it is refused, auto passes it over."""
        self._broken[method] = why

    def choose(self, requested: str) -> str:
        """The method a session asking for this gets; RequestError if it does not work."""
        return choose(requested, self._methods, self._broken)

    def open(
        self,
        caller: int,
        request: OpenSessionRequest,
        pid: int | None = None,
        prepared: tuple[Prepared, Prepared] | None = None,
    ) -> Session:
        """Check the caller's request against policy, apply it, and register the session.

        pid: the calling process (the kernel's word, as for caller): the session ends when
        it exits, as well as when its lease runs out. None (callers inside firewalld's own
        process only): the lease alone. prepared: the request's subnets and excludes as
        offload.py made them (a big request; then the request's own are a stand-in).
        """
        method = self.choose(request.method)
        self._require_policy(caller, request.uid, request.forward)
        subnets, excludes = (
            _targets(request.subnets, request.excludes)
            if prepared is None
            else _prepared(prepared, method)
        )
        # The protocol checked each address's form; a repeated one would repeat in the rules.
        dns = tuple(dict.fromkeys(map(ipaddress.ip_address, request.dns)))
        dns_versions = {address.version for address in dns}
        # DNS over TCP to an IPv6 nameserver lands on the TCP listener's IPv6 side, too.
        versions = versions_of(subnets) | dns_versions
        self._check_targets(caller, len(subnets) + len(excludes))
        owned = sum(1 for session in self._open.values() if session.caller == caller)
        if owned >= MAX_SESSIONS_PER_UID:
            raise RequestError(f"uid {caller} already has {MAX_SESSIONS_PER_UID} sessions open")
        if len(self._open) >= MAX_SESSIONS:  # what ListSessions can describe, and plenty
            raise RequestError(f"this firewalld has {MAX_SESSIONS} sessions open already")
        session_id = secrets.token_hex(16)
        # Rule names use the short id; two sessions sharing one would share their rules.
        if any(other.short_id == session_id[:12] for other in self._open.values()):
            raise RequestError("session id collision, please try again")
        session = Session(
            id=session_id,
            caller=caller,
            method=method,
            port=request.port,
            subnets=subnets,
            excludes=excludes,
            deadline=0.0,
            uid=request.uid,
            gid=request.gid,
            forward=request.forward,
            dns=dns,
            pid=pid,
            bypass_mark=free_mark(self._open.values()),
        )
        try:
            if pid is not None:
                try:
                    self.exits.watch(session_id, pid, caller)
                except (ProcessGone, OSError) as exc:  # OSError: out of descriptors, say
                    raise RequestError(f"cannot watch the calling process: {exc}") from None
            session.netns = self.namespaces.of(pid, request.uid, request.gid)
            if not self._methods[method].makes_sockets:  # else the request's port means nothing
                session.netns.run(
                    self._check_port, caller, request.port, versions, request.forward, dns_versions
                )
            session.rules = session.netns.run(self._methods[method].apply, session)
        except BaseException:
            self.exits.forget(session_id)
            self.namespaces.release(session.netns)
            raise
        # The lease starts once the rules are in: applying 10,000 of them takes a while.
        session.opened = self._clock()
        session.deadline = session.opened + self.lease
        with self.lock:
            self._open[session_id] = session
        self._changed()
        log.info(
            "session %s opened by uid %d (pid %s): %s to port %d, %d subnets, %d excludes, "
            "%d nameservers, %d rules, capturing %s",
            session.short_id,
            caller,
            pid,
            method,
            session.port,
            len(session.subnets),
            len(session.excludes),
            len(session.dns),
            session.rules,
            session.scope(),
        )
        return session

    def _check_port(
        self,
        caller: int,
        port: int,
        versions: Collection[int],
        forward: bool,
        dns_versions: Collection[int],
    ) -> None:
        """RequestError unless port is a fit redirect target for caller (port_problem)."""
        try:
            listeners = self._listeners_of_port(port)
        except SockDiagError as exc:  # without the kernel's word, the port is nobody's
            raise RequestError(f"cannot tell who listens on port {port}: {exc}") from None
        problem = port_problem(
            listeners, port, caller, versions, forward, dns_versions=dns_versions
        )
        if problem is not None:
            raise RequestError(problem)

    def owned(self, session_id: str, caller: int) -> Session:
        """The open session with this id if caller owns it; others' sessions stay invisible."""
        session = self._open.get(session_id)
        if session is None or session.caller != caller:
            raise RequestError("no such session")
        return session

    def visible(self, caller: int) -> tuple[SessionEntry, ...]:
        """The sessions caller may see, described: its own; root (uid 0) sees every one.
        Another uid's sessions stay invisible, as in owned()."""
        now = self._clock()
        return tuple(
            SessionEntry(
                session=session.short_id,
                caller=session.caller,
                method=session.method,
                port=session.port,
                subnets=len(session.subnets),
                excludes=len(session.excludes),
                nameservers=len(session.dns),
                rules=session.rules,
                uid=session.uid,
                gid=session.gid,
                forward=session.forward,
                opened=max(0.0, now - session.opened),
                lease=max(0.0, session.deadline - now),
                hosts=session.hosts,
            )
            for session in self._open.values()
            if caller in (0, session.caller)
        )

    def update(
        self,
        session: Session,
        subnets: tuple[WireTarget, ...],
        excludes: tuple[WireTarget, ...],
        prepared: tuple[Prepared, Prepared] | None = None,
    ) -> int:
        """Replace the session's subnets and excludes, with the checks open() makes for
        them; all or nothing. The new rule count. prepared: as for open()."""
        # Group membership counts as it is now, as for open().
        self._require_policy(session.caller, session.uid, session.forward)
        new_subnets, new_excludes = (
            _targets(subnets, excludes) if prepared is None else _prepared(prepared, session.method)
        )
        self._check_targets(session.caller, len(new_subnets) + len(new_excludes), session)
        try:
            rules, shortcuts = session.netns.run(
                self._apply_update, session, new_subnets, new_excludes
            )
        except BaseException:
            refused = releasable(new_subnets, new_excludes)
            new_subnets = new_excludes = ()
            free_in_pieces(refused)
            raise
        # Freed after the lock and in pieces (free_in_pieces): 100,000 targets take a while.
        old = releasable(session.subnets, session.excludes)
        with self.lock:  # a reply socket's check reads subnets and excludes together
            session.subnets, session.excludes, session.rules = new_subnets, new_excludes, rules
            session.shortcuts = shortcuts
            # As after open: applying many rules takes a while, and the caller's heartbeat
            # waits.
            self.renew(session)
        free_in_pieces(old)
        # A reply socket answers only from a destination the session still captures.
        uncaptured = [
            flow
            for flow in session.flows
            if reply_problem(
                new_subnets, new_excludes, flow.destination, flow.port, dns=session.dns
            )
        ]
        if uncaptured and self._fence is not None:
            session.netns.run(self._fence.forget_flows, session, uncaptured)
        log.info(
            "session %s of uid %d updated: %d subnets, %d excludes, %d %s rules",
            session.short_id,
            session.caller,
            len(new_subnets),
            len(new_excludes),
            rules,
            session.method,
        )
        return rules

    def _apply_update(
        self, session: Session, subnets: Targets, excludes: Targets
    ) -> tuple[int, tuple[Shortcut, ...]]:
        """update()'s port check and rules: the new rule count, and the shortcuts kept.

        A shortcut stays if the session still captures its destination and its local port
        is still the caller's; the others go, with a line in the log (the caller sets them
        again if it wants: a refusal would leave it with subnets it did not ask for)."""
        dns_versions = {address.version for address in session.dns}
        versions = versions_of(subnets) | dns_versions
        method = self._methods[session.method]
        # The port must still be the caller's, for every version captured from now on: the
        # caller may have closed its listener since open, and another uid taken the port.
        if not method.makes_sockets:
            self._check_port(session.caller, session.port, versions, session.forward, dns_versions)
        kept = []
        for shortcut in session.shortcuts:
            problem = shortcut_problem(
                subnets, excludes, versions, session.dns, shortcut
            ) or self._shortcut_port_problem(session.caller, shortcut)
            if problem is None:
                kept.append(shortcut)
            else:
                log.info("session %s drops a shortcut: %s", session.short_id, problem)
        shortcuts = tuple(kept)
        return method.update(session, subnets, excludes, shortcuts), shortcuts

    def _require_policy(self, caller: int, uid: int, forward: bool) -> None:
        """RequestError, with the policy's reason, if it does not let caller capture uid's
        traffic (and forwarded traffic, with forward)."""
        refusal = self._policy.check(caller, uid, forward)
        if refusal is not None:
            raise RequestError(refusal)

    def set_shortcuts(
        self, session: Session, shortcuts: tuple[WireShortcut, ...], limit: int
    ) -> int:
        """Replace the session's shortcuts (the protocol checked their form), each with
        this limit, all or nothing; the new rule count. Each must lie inside what the
        session captures and lead into a port where only the caller listens, on the
        loopback address of its IP version."""
        self._require_policy(session.caller, session.uid, session.forward)  # as for update()
        if session.method not in SHORTCUT_METHODS:
            raise RequestError(
                f"shortcuts need the nft or nat method, this session uses {session.method}"
            )
        if shortcuts and session.method == "nat" and session.forward:
            raise RequestError(
                "shortcuts need the nft method in a session that captures forwarded traffic: "
                "iptables cannot keep forwarded connections out of a nat session's shortcuts"
            )
        wanted = tuple(
            Shortcut(ipaddress.ip_address(address), port, local_port, limit)
            for address, port, local_port in shortcuts
        )
        for shortcut in wanted:
            problem = shortcut_problem(
                session.subnets, session.excludes, session.versions, session.dns, shortcut
            )
            if problem is not None:
                raise RequestError(problem)
        rules = session.netns.run(self._apply_shortcuts, session, wanted)
        with self.lock:  # ListSessions reads the rule count
            session.shortcuts, session.rules = wanted, rules
            self.renew(session)  # as after update: the caller's heartbeat waited
        log.info(
            "session %s of uid %d: %d shortcuts (at most %d connections each), %d %s rules",
            session.short_id,
            session.caller,
            len(wanted),
            limit,
            rules,
            session.method,
        )
        return rules

    def _apply_shortcuts(self, session: Session, shortcuts: tuple[Shortcut, ...]) -> int:
        """set_shortcuts()'s port checks and rules, in the session's namespace."""
        for shortcut in shortcuts:
            problem = self._shortcut_port_problem(session.caller, shortcut)
            if problem is not None:
                raise RequestError(problem)
        method = self._methods[session.method]
        return method.update(session, session.subnets, session.excludes, shortcuts)

    def _shortcut_port_problem(self, caller: int, shortcut: Shortcut) -> str | None:
        """Why the shortcut's local port is not a fit redirect target for caller, as for the
        session's own port (port_problem), or None if it is."""
        where = show(shortcut.address, shortcut.port)
        try:
            listeners = self._listeners_of_port(shortcut.local_port)
        except SockDiagError as exc:  # without the kernel's word, the port is nobody's
            return f"shortcut to {where}: cannot tell who listens on its port: {exc}"
        problem = port_problem(listeners, shortcut.local_port, caller, (shortcut.version,), False)
        return None if problem is None else f"shortcut to {where}: {problem}"

    def _check_targets(self, caller: int, count: int, replaced: Session | None = None) -> None:
        """RequestError if a member's sessions would hold more than MAX_TARGETS_PER_UID
        targets with count more (instead of those of replaced); root is not counted."""
        held = sum(
            len(other.subnets) + len(other.excludes)
            for other in self._open.values()
            if other.caller == caller and other is not replaced
        )
        if caller != 0 and held + count > MAX_TARGETS_PER_UID:
            raise RequestError(
                f"uid {caller}'s sessions would hold {held + count} subnets and excludes, "
                f"over {MAX_TARGETS_PER_UID}"
            )

    def renew(self, session: Session) -> None:
        session.deadline = self._clock() + self.lease

    def reply_socket(
        self, session: Session, address: str, port: int, program: str, program_port: int
    ) -> str:
        """A token for a reply socket at (address, port), inside what session captures, that
        answers the program at (program, program_port): a UDP socket here of a uid the
        session captures (the protocol checked the addresses' form and version)."""
        flow = Flow(
            ipaddress.ip_address(program), program_port, ipaddress.ip_address(address), port
        )
        if self._fence is None:
            raise RequestError("this firewalld makes no reply sockets")
        try:
            sockets = session.netns.quick(self._udp_sockets)
        except SockDiagError as exc:  # without the kernel's word, the program is nobody's
            raise RequestError(f"cannot tell whose UDP socket {program_port} is: {exc}") from None
        self._end_flows(session, sockets)
        problem = reply_problem(
            session.subnets, session.excludes, flow.destination, port, dns=session.dns
        ) or program_problem(sockets, flow.program, program_port, session.uid)
        if problem is not None:
            raise RequestError(problem)
        self.grants.room(session)  # before the socket is made, not after
        return self.grants.issue(
            session, session.netns.quick(self._fence.reply_socket, session, flow)
        )

    def heartbeat(self, session: Session) -> None:
        """The session's owner is still there: renew the lease, and end the flows whose
        program is gone."""
        self.renew(session)
        if session.flows:
            try:
                sockets = session.netns.quick(self._udp_sockets)
            except SockDiagError as exc:  # the next heartbeat looks again
                log.warning("session %s: cannot check its flows: %s", session.short_id, exc)
                return
            self._end_flows(session, sockets)

    def _end_flows(self, session: Session, sockets: list[Listener]) -> None:
        """Unfence the flows whose program no longer has its socket (sockets: every UDP
        socket here, now): the port may go to someone else, whom their replies must not
        reach."""
        if self._fence is None or not session.flows:
            return
        by_port: defaultdict[int, list[Listener]] = defaultdict(list)
        for item in sockets:
            by_port[item.port].append(item)
        ended = [
            flow
            for flow in session.flows
            if program_problem(
                by_port[flow.program_port], flow.program, flow.program_port, session.uid
            )
        ]
        if ended:
            session.netns.quick(self._fence.forget_flows, session, ended)

    def set_hosts(self, session: Session, hosts: tuple[tuple[str, str], ...]) -> int:
        """Make the session's hosts block hold these entries, if policy lets its owner;
        how many were written."""
        refusal = self._policy.check_hosts(session.caller)
        if refusal is not None:
            raise RequestError(refusal)
        asked = (len(hosts), sum(len(name) + len(address) + 2 for name, address in hosts))
        if session.caller != 0:
            self._check_hosts_room(session, asked)
        # Before writing: whatever happens next, close() looks for a block to remove.
        self._with_hosts.add(session.id)
        domains = self._policy.domains(session.caller)
        session.hosts = self._hosts.set(session.short_id, hosts, domains)
        session.hosts_asked = asked
        return session.hosts

    def _check_hosts_room(self, session: Session, asked: tuple[int, int]) -> None:
        """RequestError if the caller's sessions would ask for more of the hosts file than
        MAX_HOSTS_PER_UID entries or MAX_HOSTS_BYTES_PER_UID bytes, this one's new request
        replacing its last."""
        entries, size = asked
        for other in self._open.values():
            if other.caller == session.caller and other is not session:
                entries += other.hosts_asked[0]
                size += other.hosts_asked[1]
        if entries > MAX_HOSTS_PER_UID or size > MAX_HOSTS_BYTES_PER_UID:
            raise RequestError(
                f"uid {session.caller}'s sessions would have {entries} host names "
                f"({size} bytes) in the hosts file, more than {MAX_HOSTS_PER_UID} names or "
                f"{MAX_HOSTS_BYTES_PER_UID} bytes; the file is unchanged"
            )

    def close(self, session: Session, why: str) -> None:
        """Forget the session and remove its rules; never raises."""
        with self.lock:
            self._forget(session)
        self._remove(session, why)

    def _forget(self, session: Session) -> None:
        """Under the lock: the loop no longer finds the session, nor hands its sockets over."""
        if self._open.pop(session.id, None) is not None:
            self._changed()
        self.exits.forget(session.id)
        try:
            self.grants.revoke(session)  # closes the reply sockets not fetched yet
        except Exception:
            log.exception("revoking the tokens of session %s failed", session.short_id)

    def _remove(self, session: Session, why: str) -> None:
        """Remove the rules and hosts block of a session forgotten already; never raises."""
        try:
            session.netns.run(self._methods[session.method].remove, session)
        except Exception:  # a method must not raise here; if it does, the others still go
            log.exception("removing session %s failed", session.short_id)
        self.namespaces.release(session.netns)
        if session.id in self._with_hosts:
            self._with_hosts.discard(session.id)
            try:
                self._hosts.remove(session.short_id)
            except Exception:
                log.exception("removing the hosts block of session %s failed", session.short_id)
        log.info(
            "session %s of uid %d %s: %d %s rules removed",
            session.short_id,
            session.caller,
            why,
            session.rules,
            session.method,
        )
        # Its targets go now, in pieces, not whenever the last reference to it goes.
        with self.lock:
            targets = releasable(session.subnets, session.excludes)
            session.subnets = session.excludes = ()
        free_in_pieces(targets)

    def _changed(self) -> None:
        try:
            self._on_change(len(self._open))
        except Exception:  # only a report: whatever happened to the session stands
            log.exception("reporting the number of sessions failed")

    def expire(self, busy: Collection[str] = ()) -> int:
        """Close every session whose lease has run out or whose opener has exited, except
        those with a request waiting or being applied (ids in busy: the request ends by
        renewing the lease, or the session); return how many."""
        with self.lock:  # chosen and forgotten at once: a heartbeat comes before, or too late
            exited = set(self.exits.exited())
            now = self._clock()
            ended = [
                (session, f"ended: its process (pid {session.pid}) exited")
                if session.id in exited
                else (session, f"expired (no heartbeat for {self.lease:g} s)")
                for session in self._open.values()
                if session.id not in busy and (session.id in exited or session.deadline <= now)
            ]
            for session, _ in ended:
                self._forget(session)
            self.grants.expire()
        for session, why in ended:
            self._remove(session, why)
        return len(ended)

    def close_all(self, why: str) -> None:
        for session in list(self._open.values()):
            self.close(session, why)


def shortcut_problem(
    subnets: Targets,
    excludes: Targets,
    versions: Collection[int],
    dns: Collection[Address],
    shortcut: Shortcut,
) -> str | None:
    """Why a session capturing subnets minus excludes (versions: the IP versions it
    captures; dns: its nameservers) may not have this shortcut, or None if it may: its
    destination must be one the session's capture rule takes, else the shortcut would send
    connections the session does not capture, or would never be reached."""
    address, port = shortcut.address, shortcut.port
    why: str | None
    if shortcut.version not in versions:
        why = f"this session captures no IPv{shortcut.version}"
    elif address in LOOPBACK[shortcut.version]:
        why = "a loopback address, which no session captures"
    elif port == DNS_PORT and address in dns:  # their DNS rule comes first in the chain
        why = "a nameserver of the session, whose DNS it captures"
    else:
        why = _uncaptured(subnets, excludes, address, port)
    return None if why is None else f"shortcut to {show(address, port)}: {why}"


def _uncaptured(subnets: Targets, excludes: Targets, address: Address, port: int) -> str | None:
    """Why subnets minus excludes do not take (address, port), or None if they do."""
    try:
        if not covers(subnets, address, port):
            return "not inside the session's subnets"
        if covers(excludes, address, port):
            return "excluded from the session"
    except ValueError:  # nat's targets prepared without boxes: offload.wire_of says why
        return "the session's subnets overlap in too many ways to tell"
    return None


def _targets(
    subnets: tuple[WireTarget, ...], excludes: tuple[WireTarget, ...]
) -> tuple[Targets, Targets]:
    return tuple(map(Target.from_wire, subnets)), tuple(map(Target.from_wire, excludes))


def _prepared(prepared: tuple[Prepared, Prepared], method: str) -> tuple[Targets, Targets]:
    """offload.py's subnets and excludes, if made for this method."""
    if any(part.method != method for part in prepared):
        # The method was chosen before the child ran and again now: only a change between
        # the two (none happens while firewalld runs) could differ.
        raise RequestError(f"the request was prepared for another method than {method}")
    return prepared


def free_in_pieces(items: list[T]) -> None:
    """Drop the list's items, FREE_CHUNK at a time, leaving it empty; the caller holds no
    other reference to them. Freeing a tuple of 100,000 targets is one call in C that never
    lets go of the GIL: it held the loop's thread for 0.1 s and more. Between two chunks the
    loop gets its turn, as between any two lines of Python."""
    while items:
        del items[-FREE_CHUNK:]
