"""The agent daemon: migration sockets, the transport listener, the admin API.

For every peer P the agent listens on ``<socket_dir>/to/P.sock``. A QEMU connecting there is
migrating to P: the connection is carried over a transport session to P's agent, which
connects to ``<socket_dir>/to/P.sock`` on its own host, where P's incoming QEMU listens
(libvirt's unix-socket migration uses one path on both hosts). Several connections of one
migration (multifd channels) are delivered in their order of arrival: QEMU 7.2 tells the main
channel from the others by that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from dwcp_migrate.agent.admin import AdminServer
from dwcp_migrate.agent.channel import (
    PROTOCOL_VERSION,
    MessageType,
    encode,
    encode_json,
)
from dwcp_migrate.agent.codecs import guest_ram_bytes, make_decoder, make_encoder
from dwcp_migrate.agent.config import AUTO, AgentConfig, PeerConfig
from dwcp_migrate.agent.credit import DeliveryCredit, encode_credit
from dwcp_migrate.agent.datapath import (
    DELIVERY_PIPELINE_DEPTH,
    MessageStream,
    SerializedSender,
    qemu_to_session,
    run_pumps,
    session_to_qemu,
)
from dwcp_migrate.agent.lane import LaneError, LaneListener, LaneUnreachableError
from dwcp_migrate.agent.lanes import (
    carry_on_direct_lane,
    carry_on_tls_lane,
    deliver_on_direct_lane,
    deliver_on_tls_lane,
    direct_lane_or_decline,
    open_direct_lane,
    tls_dialers,
    tls_lane_or_decline,
)
from dwcp_migrate.agent.qemuio import QemuConnection, QemuListener, ReadAhead, connect_qemu
from dwcp_migrate.agent.records import ChannelCounters, MigrationLog, MigrationRecord
from dwcp_migrate.agent.tlslane import TlsLaneListener, open_tls_lane
from dwcp_migrate.errors import MigrationError
from dwcp_migrate.pagecodec.memory import release_pool
from dwcp_migrate.policies.mode import (
    Mode,
    ModeTracker,
    PathSample,
    choose_data_path,
    defaults_for,
    get_mode_policy,
)
from dwcp_migrate.transports.adapt import StreamRange
from dwcp_migrate.transports.sockopts import TcpOptions
from dwcp_migrate.transports.tcp import (
    TcpSession,
    TransportConfig,
    connect_session,
)
from dwcp_migrate.transports.tcp_server import SessionServer

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 30.0  # destination: deliver to QEMU and answer within this
QEMU_CONNECT_TIMEOUT = 20.0  # destination: wait this long for the incoming QEMU's socket
READ_AHEAD_BYTES = 64 << 20  # source: read from QEMU during the session handshake, at most
FIRST_BYTES_WAIT = 1.0  # source: wait this long for QEMU's first bytes (guest RAM size)
MEM_SIZE_PREFIX = 64 << 10  # MEM_SIZE comes within QEMU's first bytes (header, config)
POOL_IDLE_S = 30.0  # no migration for this long: unmap the pooled page caches


@dataclass
class OutgoingMigration:
    """Source side: connections to one peer that belong to one migration."""

    record: MigrationRecord
    open_channels: int = 0
    next_index: int = 0
    main_open: bool = True
    errors: list[str] = field(default_factory=list)
    guest_ram: int | None = None  # from the main channel's MEM_SIZE, for the other channels


@dataclass
class IncomingMigration:
    record: MigrationRecord
    connected: dict[int, asyncio.Event] = field(default_factory=dict)
    open_channels: int = 0
    errors: list[str] = field(default_factory=list)

    def event(self, index: int) -> asyncio.Event:
        return self.connected.setdefault(index, asyncio.Event())


# The least the source's send window may shrink to when it follows the delivery rate: a LAN's
# RTT is too short for rate x RTT to be a useful window (policies/mode.py: relay_window).
RELAY_WINDOW_FLOOR = 4 << 20


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.migrations = MigrationLog(config.state_dir)
        self.transport = TransportConfig(
            security=config.security,
            # "auto" starts with bbr (the internet's choice) and is retuned per path mode.
            tcp=TcpOptions(congestion_control="bbr" if config.transport.congestion_control
                           == AUTO else config.transport.congestion_control),
            adapt=StreamRange(config.transport.min_streams, config.transport.max_streams)
            if config.transport.adapt else None,
        )
        self._unix_servers: list[QemuListener] = []
        self._session_server: SessionServer | None = None
        self._admin: AdminServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outgoing: dict[str, OutgoingMigration] = {}  # peer -> migration in progress
        self._incoming: dict[str, IncomingMigration] = {}  # migration id -> state
        self.started = time.time()
        self.refuse_incoming: str | None = None  # set by an operator or a policy
        self._libvirt: Any = None  # LibvirtMigrator, made on first use (imports libvirt)
        self._job_peers: dict[str, str] = {}  # peer -> libvirt job id of its migration
        self._mode_policy = get_mode_policy("threshold")
        # RDMA is chosen at start from this host's devices; the data path itself runs over
        # TCP sessions (the RDMA transport is tested only against a fake verbs layer).
        self.transport_choice: tuple[str, str] = ("tcp", "not chosen yet")
        self._trackers: dict[str, ModeTracker] = {}  # peer -> path mode history
        # Page caches of ended migrations stay mapped for the next one (pagecodec.memory)
        # until the agent has been idle this long.
        self._pool_timer: asyncio.TimerHandle | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        (cfg.socket_dir / "to").mkdir(parents=True, exist_ok=True)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        for peer in cfg.peers.values():
            listener = QemuListener(cfg.outgoing_socket(peer.name), self._qemu_handler(peer))
            await listener.start(mode=0o600)
            self._unix_servers.append(listener)
        self._session_server = SessionServer(name=cfg.name, config=self.transport,
                                             allowed_peers=list(cfg.peers))
        await self._session_server.start(cfg.listen_host, cfg.listen_port)
        self._spawn(self._accept_sessions())
        self._admin = AdminServer(self, cfg.admin_socket)
        await self._admin.start()
        self.transport_choice = await asyncio.to_thread(_choose_transport, cfg)
        log.info("transport: %s (%s)", *self.transport_choice)
        log.info("agent %s listening on %s:%d, migration sockets in %s, peers: %s", cfg.name,
                 cfg.listen_host, self._session_server.port, cfg.socket_dir / "to",
                 ", ".join(cfg.peers) or "none")

    async def stop(self) -> None:
        if self._pool_timer is not None:
            self._pool_timer.cancel()
        for server in self._unix_servers:
            server.close()
        if self._session_server is not None:
            await self._session_server.close()
        if self._admin is not None:
            await self._admin.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for peer in self.config.peers:
            with contextlib.suppress(FileNotFoundError):
                self.config.outgoing_socket(peer).unlink()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                # Handlers record their own errors; this catches bugs in the handlers.
                log.error("agent task failed: %r", t.exception(), exc_info=t.exception())
        task.add_done_callback(done)
        return task

    # ---- libvirt-driven migrations ------------------------------------------------------------
    async def start_libvirt_migration(self, domain: str, to: str,
                                      bandwidth_mib: Any = None) -> dict[str, Any]:
        from dwcp_migrate.agent.libvirt_jobs import LibvirtMigrator

        if not domain:
            raise MigrationError("which domain? (migrate needs a domain name)")
        peer = self.config.peers.get(to)
        if peer is None:
            raise MigrationError(f"{to!r} is not a peer of agent {self.config.name} (peers: "
                                 f"{', '.join(sorted(self.config.peers)) or 'none'})")
        if bandwidth_mib is not None and (not isinstance(bandwidth_mib, int)
                                          or bandwidth_mib <= 0):
            raise MigrationError(f"bandwidth_mib must be a positive integer, got "
                                 f"{bandwidth_mib!r}")
        if self._libvirt is None:
            self._libvirt = LibvirtMigrator()
        migrate_uri = f"unix://{self.config.outgoing_socket(peer.name)}"
        job = await asyncio.to_thread(self._libvirt.start, domain, peer.name, peer.libvirt_uri,
                                      migrate_uri, bandwidth_mib)
        self._job_peers[peer.name] = job.id
        return {"job": job.to_json()}

    def job_status(self, job_id: str) -> dict[str, Any]:
        job = self._libvirt.jobs.get(job_id) if self._libvirt is not None else None
        if job is None:
            raise MigrationError(f"no migration job {job_id!r} on this agent")
        out = job.to_json()
        record = next((r for r in self.migrations.active.values()
                       if r.peer == job.peer and r.role == "source"), None)
        if record is None:
            record_json = next((r for r in reversed(self.migrations.recent)
                                if r.get("domain") == job.domain and r.get("peer") == job.peer
                                and r.get("started", 0) >= job.started - 1), None)
        else:
            record_json = record.to_json()
        return {"job": out, "record": record_json}

    def status(self) -> dict[str, Any]:
        return {"name": self.config.name, "peers": sorted(self.config.peers),
                "transport": {"kind": self.transport_choice[0],
                              "reason": self.transport_choice[1]},
                "uptime_s": time.time() - self.started,
                "refusing_incoming": self.refuse_incoming, **self.migrations.snapshot()}

    def _finish(self, record: MigrationRecord, error: str | None) -> None:
        self.migrations.finish(record, error)
        if self._pool_timer is not None:
            self._pool_timer.cancel()
        self._pool_timer = asyncio.get_running_loop().call_later(
            POOL_IDLE_S, self._release_caches)

    def _release_caches(self) -> None:
        """Idle for a while: give the pooled page caches' memory back to the system."""
        self._pool_timer = None
        if not self.migrations.active:
            freed = release_pool()
            if freed:
                log.info("released %d MiB of pooled page caches (idle %g s)", freed >> 20,
                         POOL_IDLE_S)

    def _initial_streams(self, tracker: ModeTracker | None) -> int:
        """Connections to open: as configured, else the count of the mode last seen on this
        path, else the most any mode uses (surplus ones are retired once the mode is known,
        which is cheaper than opening more then)."""
        configured = self.config.transport.streams
        if configured is not None:
            return configured
        if tracker is not None and tracker.decision is not None:
            return defaults_for(tracker.decision.mode).streams
        return max(defaults_for(m).streams for m in Mode)

    def _tune_session(self, session: TcpSession, mode: Mode) -> None:
        """Apply the path mode's connection count and congestion control where the
        configuration leaves them to it (``auto``)."""
        defaults = defaults_for(mode)
        settings = self.config.transport
        if settings.congestion_control == AUTO and defaults.congestion_control:
            session.retune(replace(self.transport.tcp,
                                   congestion_control=defaults.congestion_control))
        if settings.streams is None:
            # The mode's count and adaptation range (within the configured one); the goodput
            # seen so far was at the first-contact count and says nothing about this one.
            low = max(defaults.min_streams, settings.min_streams)
            high = max(low, min(defaults.max_streams, settings.max_streams))
            count = min(max(defaults.streams, low), high)
            session.restart(count, StreamRange(low, high) if settings.adapt else None)
            adapting = f", adapting within {low}..{high}" if settings.adapt else ""
            log.info("session to %s: %s path: %d connection%s%s, %s", session.peer, mode.value,
                     count, "" if count == 1 else "s", adapting, session.congestion_control)

    # ---- source side ----------------------------------------------------------------------
    def _qemu_handler(self, peer: PeerConfig) -> Callable[[QemuConnection], None]:
        def handler(qemu: QemuConnection) -> None:
            self._spawn(self._on_qemu_connection(peer, qemu))
        return handler

    def _outgoing_for(self, peer: PeerConfig) -> OutgoingMigration:
        current = self._outgoing.get(peer.name)
        if current is not None and current.main_open:
            return current  # a further channel (multifd) of the migration in progress
        record = self.migrations.start(MigrationRecord.new("source", peer.name))
        job_id = self._job_peers.get(peer.name)
        job = self._libvirt.jobs.get(job_id) if self._libvirt is not None and job_id else None
        if job is not None and job.ended is None:
            record.domain = job.domain
        current = OutgoingMigration(record)
        self._outgoing[peer.name] = current
        return current

    async def _on_qemu_connection(self, peer: PeerConfig, qemu: QemuConnection) -> None:
        mig = self._outgoing_for(peer)
        index = mig.next_index
        mig.next_index += 1
        mig.open_channels += 1
        counters = mig.record.channel(index)
        error: str | None = None
        session: TcpSession | None = None
        # QEMU streams on into memory during the handshake (several round trips on a WAN).
        ahead = ReadAhead(qemu, READ_AHEAD_BYTES)
        tracker = self._trackers.get(peer.name)
        try:
            started = time.monotonic()
            session = await connect_session(
                (peer.host, peer.port), self._initial_streams(tracker), name=self.config.name,
                peer_name=peer.name, config=self.transport)
            connect_s = time.monotonic() - started
            stats = session.stats()
            # The kernel's RTT of the fresh connections; the handshake time only as a fallback
            # (it holds TLS and the first connections' setup, so it overestimates).
            samples = [r for r in (stats.tcp_rtt_ms, stats.min_rtt_ms) if r]
            rtt_ms = min(samples) if samples else connect_s * 1000
            # One tracker per peer: its history and hysteresis span migrations, so one odd
            # sample does not flip a path between datacenter and internet.
            tracker = self._trackers.setdefault(peer.name, ModeTracker(self._mode_policy))
            decision = tracker.add(PathSample(asyncio.get_running_loop().time(), rtt_ms=rtt_ms))
            self._tune_session(session, decision.mode)
            # Bound what the session holds between the two QEMUs (the peer's receive window
            # is asked for in OPEN): it drains after the guest has stopped.
            session.set_send_window(defaults_for(decision.mode).relay_window,
                                    adaptive_floor=RELAY_WINDOW_FLOOR)
            mode, reason = choose_data_path(self.config.codec.mode, decision)
            if index == 0:
                mig.record.mode, mig.record.mode_reason = mode, reason
            encoder = None
            if mode == "encode":
                # The guest's RAM size (MEM_SIZE, in QEMU's first write) bounds the cache.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FIRST_BYTES_WAIT):
                        await ahead.first.wait()
                if index == 0:
                    mig.guest_ram = guest_ram_bytes(ahead.prefix(MEM_SIZE_PREFIX))
                encoder = make_encoder(self.config.codec, decision.mode, mig.guest_ram)
            want_lane = self._lane_for(mode)
            open_msg: dict[str, Any] = {
                "version": PROTOCOL_VERSION, "migration": mig.record.id, "channel": index,
                "source": self.config.name, "target": peer.name, "mode": mode,
                "codec": encoder.describe() if encoder is not None else None,
                "lane": want_lane, "lane_verdict": want_lane is not None,
                "relay_window": defaults_for(decision.mode).relay_window,
                "delivery_credit": encoder is not None}
            for part in encode_json(MessageType.OPEN, open_msg):
                counters.wire_bytes += len(part)
                await session.send(part)
            messages = MessageStream(session, peer.name)
            async with asyncio.timeout(OPEN_TIMEOUT + 10):
                reply = await messages.next()
            if reply is None or reply.type is MessageType.REFUSE:
                why = reply.text() if reply is not None else "closed the session"
                raise MigrationError(f"agent {peer.name} refused the migration: {why}")
            if reply.type is not MessageType.ACCEPT:
                raise MigrationError(f"agent {peer.name} answered OPEN with {reply.type.name}")
            log.info("migration %s channel %d to %s: %s (%s); session up in %.3f s, "
                     "accepted after %.3f s", mig.record.id, index, peer.name, mode, reason,
                     connect_s, time.monotonic() - started)
            loop = asyncio.get_running_loop()
            head, head_eof = await ahead.stop()
            offer = reply.json().get("lane") if want_lane else None
            if want_lane and not offer:
                log.info("migration %s channel %d: agent %s offers no %s lane (its "
                         "transport.%s_lane is off): passthrough over the session",
                         mig.record.id, index, peer.name, want_lane, want_lane)
            declined: str | None = None
            if offer:
                try:
                    if want_lane == "tls":
                        assert self.config.security.tls is not None
                        dialers = tls_dialers(self.config.security.tls, peer, offer)
                        await open_tls_lane(*dialers)
                    else:
                        direct = await open_direct_lane(peer, offer)
                except LaneUnreachableError as exc:  # nothing sent on it: the session can
                    declined = str(exc)
                    log.warning("migration %s channel %d: %s; passthrough through the "
                                "session instead", mig.record.id, index, declined)
                    for part in encode_json(MessageType.LANE_DECLINED, {"why": declined}):
                        counters.wire_bytes += len(part)
                        await session.send(part)
                else:
                    if reply.json().get("lane_verdict") is True:  # else an older agent
                        for part in encode(MessageType.LANE_TAKEN):
                            counters.wire_bytes += len(part)
                            await session.send(part)
                    if want_lane == "tls":
                        mig.record.transport[str(index)] = await carry_on_tls_lane(
                            qemu, *dialers, head, counters)
                    else:
                        log.warning("direct lane to %s: passthrough bytes go unencrypted and "
                                    "are checked only by TCP (transport.direct_lane is on)",
                                    peer.name)
                        await carry_on_direct_lane(qemu, direct, head, counters)
                        mig.record.transport[str(index)] = {"lane": "direct"}
                    await session.close()
                    return
            credit = None
            if encoder is not None and reply.json().get("delivery_credit") is True:
                credit = DeliveryCredit(peer.name, min_rtt=lambda: session.core.min_rtt)
            on_credit = None if credit is None else partial(
                _take_credit, credit, counters, loop)
            up = asyncio.ensure_future(qemu_to_session(
                qemu, session, counters, encoder,
                (lambda fn: loop.run_in_executor(None, fn)) if encoder is not None else None,
                head=head, head_eof=head_eof, credit=credit))
            down = asyncio.ensure_future(session_to_qemu(messages, qemu, counters, None,
                                                         count_as_return=True,
                                                         on_credit=on_credit))
            await run_pumps(up, down, session, peer.name)
            connections = session.n_connections
            await session.close()
            mig.record.transport[str(index)] = {**_transport_stats(session),
                                                "connections_at_end": connections}
            if declined is not None:
                mig.record.transport[str(index)]["lane_declined"] = declined
            if credit is not None:
                mig.record.transport[str(index)].update(credit.stats())
            if encoder is not None:
                mig.record.codec[str(index)] = encoder.stats()
                if index == 0:
                    mig.record.iterations = encoder.iterations()
        except (Exception, asyncio.CancelledError) as exc:
            error = _describe(exc, f"carrying the migration to {peer.name}")
            if session is not None:
                session.abort(error)
        finally:
            with contextlib.suppress(BaseException):
                await ahead.stop()
            _close_qemu(qemu, abort=error is not None)
            if index == 0:
                mig.main_open = False
            mig.open_channels -= 1
            if error:
                mig.errors.append(f"channel {index}: {error}")
            if mig.open_channels == 0 and not mig.main_open:
                self._finish(mig.record, "; ".join(mig.errors) or None)
                if self._outgoing.get(peer.name) is mig:
                    del self._outgoing[peer.name]

    def _lane_for(self, mode: str) -> str | None:
        """Which lane a passthrough channel asks the destination for, if any."""
        if mode != "passthrough":
            return None
        if self.config.transport.direct_lane:
            return "direct"
        if self.config.transport.tls_lane and self.config.security.tls is not None:
            return "tls"
        return None

    # ---- destination side -----------------------------------------------------------------
    async def _accept_sessions(self) -> None:
        assert self._session_server is not None
        while True:
            session = await self._session_server.accept()
            self._spawn(self._on_session(session))

    async def _on_session(self, session: TcpSession) -> None:
        peer = session.core.peer_name or session.peer
        messages = MessageStream(session, peer)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                first = await messages.next()
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("session from %s ended before OPEN: %s", peer, exc)
            session.abort("no OPEN")
            return
        if first is None or first.type is not MessageType.OPEN:
            log.warning("session from %s did not start with OPEN; dropped", peer)
            session.abort("expected OPEN")
            return
        try:
            request = first.json()
            mig, index = self._admit(peer, request)
        except MigrationError as exc:
            log.warning("refused a migration from %s: %s", peer, exc)
            with contextlib.suppress(Exception):
                await session.send(b"".join(_refuse(str(exc))))
                await session.close()
            return
        await self._deliver(session, messages, mig, index, request)

    def _admit(self, peer: str, request: dict[str, Any]) -> tuple[IncomingMigration, int]:
        if request.get("version") != PROTOCOL_VERSION:
            raise MigrationError(f"channel protocol version {request.get('version')} is not "
                                 f"supported (this agent speaks {PROTOCOL_VERSION})")
        if request.get("target") != self.config.name:
            raise MigrationError(f"this agent is {self.config.name}, not "
                                 f"{request.get('target')!r}")
        if request.get("source") != peer:
            raise MigrationError(f"the session is from {peer} but OPEN names "
                                 f"{request.get('source')!r}")
        if self.refuse_incoming:
            raise MigrationError(self.refuse_incoming)
        migration_id, index = request.get("migration"), request.get("channel")
        if not isinstance(migration_id, str) or not isinstance(index, int) or index < 0:
            raise MigrationError("OPEN lacks a migration id or channel index")
        if request.get("mode") not in ("encode", "passthrough"):
            raise MigrationError(f"unknown data mode {request.get('mode')!r}")
        mig = self._incoming.get(migration_id)
        if mig is None:
            record = self.migrations.start(
                MigrationRecord.new("destination", peer, migration_id))
            record.mode = request["mode"]
            mig = IncomingMigration(record)
            self._incoming[migration_id] = mig
        return mig, index

    async def _deliver(self, session: TcpSession, messages: MessageStream,
                       mig: IncomingMigration, index: int, request: dict[str, Any]) -> None:
        counters = mig.record.channel(index)
        mig.open_channels += 1
        error: str | None = None
        qemu: QemuConnection | None = None
        listener: LaneListener | None = None
        tls_listener: TlsLaneListener | None = None
        try:
            decoder = make_decoder(self.config.codec, request.get("codec")) \
                if request["mode"] == "encode" else None
            if index > 0:  # keep the order of arrival: QEMU 7.2 relies on it
                async with asyncio.timeout(QEMU_CONNECT_TIMEOUT):
                    await mig.event(index - 1).wait()
            qemu = await _connect_qemu(self.config.outgoing_socket(self.config.name))
            mig.event(index).set()
            # Delivery credit (agent/credit.py) is for encoded data only: passthrough bytes
            # are bounded by the session's windows as they are.
            credit = request.get("delivery_credit") is True and decoder is not None
            # LANE_TAKEN (agent/lanes.py): absent from OPEN, an older source agent
            verdict = request.get("lane_verdict") is True
            accept: dict[str, Any] = {"channel": index, "delivery_credit": credit,
                                      "lane_verdict": verdict}
            if (request.get("lane") == "direct" and request["mode"] == "passthrough"
                    and self.config.transport.direct_lane):
                try:
                    listener = LaneListener(self.config.listen_host,
                                            self.config.transport.direct_lane_ports)
                    accept["lane"] = {"port": listener.port, "token": listener.token.hex()}
                except (LaneError, OSError) as exc:  # the session carries it instead
                    log.warning("migration %s channel %d: no direct lane (%s); passthrough "
                                "through the session", request.get("migration"), index, exc)
            if (request.get("lane") == "tls" and request["mode"] == "passthrough"
                    and self.config.transport.tls_lane and self.config.security.tls):
                try:
                    tls_listener = TlsLaneListener(self.config.listen_host,
                                                   self.config.security.tls, messages.peer,
                                                   self.config.transport.direct_lane_ports)
                    accept["lane"] = {"port": tls_listener.port,
                                      "token": tls_listener.token.hex()}
                except (LaneError, OSError) as exc:  # the session carries it instead
                    log.warning("migration %s channel %d: no TLS lane (%s); passthrough "
                                "through the session", request.get("migration"), index, exc)
            for part in encode_json(MessageType.ACCEPT, accept):
                counters.wire_bytes += len(part)
                await session.send(part)
            declined: str | None = None
            if listener is not None:
                lane, declined = await direct_lane_or_decline(listener, messages,
                                                             verdict=verdict)
                if lane is not None:
                    await deliver_on_direct_lane(lane, qemu, counters)
                    await session.close()
                    return
            if tls_listener is not None:
                declined = await tls_lane_or_decline(tls_listener, messages, verdict=verdict)
                if declined is None:
                    mig.record.transport[str(index)] = await deliver_on_tls_lane(
                        tls_listener, qemu, counters)
                    await session.close()
                    return
                tls_listener.close()
            if declined is not None:
                log.warning("migration %s channel %d: the source agent could not connect to "
                            "the %s lane (%s); passthrough through the session instead",
                            request.get("migration"), index,
                            "TLS" if tls_listener is not None else "direct", declined)
            window = request.get("relay_window")
            if isinstance(window, int) and window > 0:  # absent: an older source agent
                session.set_recv_window(window)
            loop = asyncio.get_running_loop()
            # The return path and the CREDIT reports share the session's sending side.
            sender = SerializedSender(session)
            down = asyncio.ensure_future(session_to_qemu(
                messages, qemu, counters, decoder, count_as_return=False,
                depth=DELIVERY_PIPELINE_DEPTH,
                run_decoder=(lambda fn: loop.run_in_executor(None, fn))
                if decoder is not None else None,
                report_delivered=partial(_report_credit, sender, counters) if credit
                else None))
            up = asyncio.ensure_future(qemu_to_session(qemu, sender, counters, None))
            await run_pumps(down, up, session, messages.peer)
            await session.close()
            mig.record.transport[str(index)] = _transport_stats(session)
            if declined is not None:
                mig.record.transport[str(index)]["lane_declined"] = declined
        except (Exception, asyncio.CancelledError) as exc:
            error = _describe(exc, f"delivering the migration from {messages.peer}")
            with contextlib.suppress(Exception):
                if qemu is None:  # nothing reached QEMU: tell the source why
                    async with asyncio.timeout(2):
                        await session.send(b"".join(_refuse(error)))
            session.abort(error)
        finally:
            if listener is not None:
                listener.close()
            if tls_listener is not None:
                tls_listener.close()
            if qemu is not None:
                _close_qemu(qemu, abort=error is not None)
            counters.wire_bytes += messages.wire_bytes
            mig.open_channels -= 1
            if error:
                mig.errors.append(f"channel {index}: {error}")
            if mig.open_channels == 0:
                self._finish(mig.record, "; ".join(mig.errors) or None)
                self._incoming.pop(mig.record.id, None)


def _choose_transport(cfg: AgentConfig) -> tuple[str, str]:
    """TCP, and why not RDMA (logged at start and shown by ``dwcp status``)."""
    from dwcp_migrate.transports.pyverbs_verbs import scan_devices

    scan = scan_devices()
    if not scan.devices:
        return "tcp", scan.reason or "no RDMA device on this host"
    names = ", ".join(d.name for d in scan.devices)
    return "tcp", (f"RDMA device found ({names}), but the agent's data path runs over TCP "
                   "sessions in this version (the RDMA transport is tested only against a "
                   "fake verbs layer)")


def _transport_stats(session: TcpSession) -> dict[str, Any]:
    stats = session.stats()
    return {"connections_opened": stats.connections_opened,
            "connections_lost": stats.connections_lost, "frames_resent": stats.frames_resent,
            "corrupt_frames": stats.corrupt_frames, "tcp_retransmits": stats.tcp_retransmits,
            "goodput_mbit_s": round(stats.goodput_mbit_s, 1),
            "srtt_ms": stats.srtt_ms, "congestion_control": stats.congestion_control}


def _take_credit(credit: DeliveryCredit, counters: ChannelCounters,
                 loop: asyncio.AbstractEventLoop, delivered: int) -> None:
    credit.on_credit(delivered, sent=counters.bytes_from_qemu, now=loop.time())


async def _report_credit(sender: SerializedSender, counters: ChannelCounters,
                         delivered: int) -> None:
    message = b"".join(encode(MessageType.CREDIT, encode_credit(delivered)))
    counters.wire_bytes += len(message)
    await sender.send(message)


def _refuse(reason: str) -> list[bytes]:
    return encode(MessageType.REFUSE, reason.encode()[:4096])


async def _connect_qemu(path: Any) -> QemuConnection:
    """Connect to the incoming QEMU; it may still be creating its socket."""
    deadline = time.monotonic() + QEMU_CONNECT_TIMEOUT
    while True:
        try:
            return await connect_qemu(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                raise MigrationError(f"no QEMU is listening at {path} on this host (is the "
                                     f"destination VM started with -incoming there?): "
                                     f"{exc}") from exc
            await asyncio.sleep(0.05)


def _close_qemu(qemu: QemuConnection, *, abort: bool) -> None:
    if abort:
        qemu.abort()  # a reset: QEMU must see a failure, not a clean end
    else:
        qemu.close()


def _describe(exc: BaseException, doing: str) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return f"{doing}: the agent is shutting down"
    if isinstance(exc, TimeoutError):
        return f"{doing}: timed out"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, MigrationError) else f"{doing}: {text}"
