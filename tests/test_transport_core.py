"""The AMST protocol core without sockets: frames, ordering, windows, failover, bad peers.

A small simulated network (:class:`SimNet`) plays the driver: it moves the bytes each session
pulls for a connection to the other side in random-sized pieces, in random order across
connections, breaks connections (losing whatever was in flight both ways, like a reset), and
opens replacements as the asyncio driver does. Hypothesis chooses sizes, windows, connection
counts and the schedule; every run checks that what arrived is exactly what was sent and that
neither side ever held more than its windows allow.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dwcp_migrate.transports.acceptor import SessionTable
from dwcp_migrate.transports.errors import (
    AuthenticationError,
    BadMagicError,
    ChecksumError,
    FrameTooLargeError,
    HandshakeError,
    PeerError,
    ProtocolError,
    SequenceError,
    SessionClosedError,
    TransportError,
    UnknownSessionError,
    VersionMismatchError,
)
from dwcp_migrate.transports.flow import DeliveryWindow, RecvStream, SendStream
from dwcp_migrate.transports.frames import (
    HEADER_SIZE,
    AckInfo,
    BufferPool,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    Hello,
    Role,
    encode_frame,
    encode_header,
    xxh3_64,
)
from dwcp_migrate.transports.session import (
    ConnectionDropped,
    Session,
    SessionConfig,
    SessionEnded,
    SessionState,
)


# ---- a simulated network --------------------------------------------------------------------
@dataclass
class Link:
    cid: int
    to_acc: bytearray = field(default_factory=bytearray)
    to_ini: bytearray = field(default_factory=bytearray)
    accepted: bool = False
    pre_reader: FrameReader | None = None
    ini_closing: bool = False  # the initiator's driver closes after writing what it pulled
    acc_closing: bool = False
    dead: bool = False


class SimNet:
    """Two sessions joined by ``n`` simulated TCP connections (ordered, reliable, breakable)."""

    def __init__(self, rng: random.Random, n: int, cfg_i: SessionConfig,
                 cfg_a: SessionConfig, *, corrupt: bool = False) -> None:
        self.rng = rng
        self.now = 0.0
        self.ini = Session(Role.INITIATOR, cfg_i, local_name="a", now=0.0, peer="sim-b")
        self.table = SessionTable(cfg_a, "b")
        self.acc: Session | None = None
        self.links: dict[int, Link] = {}
        self.target = n
        self.errors: list[TransportError] = []
        self.corrupt = corrupt
        self.flips = 0  # chunks corrupted on their way to the acceptor
        for _ in range(n):
            self.open()

    def open(self) -> None:
        cid = self.ini.open_connection(self.now, label=f"sim:{len(self.links)}")
        self.links[cid] = Link(cid, pre_reader=self.table.new_reader("sim-a"))

    def live(self) -> list[Link]:
        return [link for link in self.links.values() if not link.dead]

    def kill(self, link: Link) -> None:
        """A reset: both sides lose what was in flight and see the connection fail."""
        if link.dead:
            return
        link.dead = True
        link.to_acc.clear()
        link.to_ini.clear()
        self.ini.connection_lost(link.cid, self.now, "reset")
        if self.acc is not None and link.accepted:
            self.acc.connection_lost(link.cid, self.now, "reset")

    def _events(self) -> None:
        sessions = [(self.ini, "ini")] + ([(self.acc, "acc")] if self.acc else [])
        for session, side in sessions:
            for ev in session.events():
                if isinstance(ev, ConnectionDropped):
                    link = self.links.get(ev.cid)
                    if link is not None:
                        if side == "ini":
                            link.ini_closing = True
                        else:
                            link.acc_closing = True
                    if ev.error is not None:
                        self.errors.append(ev.error)
                elif isinstance(ev, SessionEnded) and ev.error is not None:
                    self.errors.append(ev.error)
                    for link in self.links.values():  # the driver closes every connection
                        if side == "ini":
                            link.ini_closing = True
                        else:
                            link.acc_closing = True

    def step(self, *, budget: int, kill_p: float = 0.0) -> None:
        rng = self.rng
        self.now += rng.choice((0.0, 0.0005, 0.002, 0.01))
        for s in (self.ini, self.acc):
            if s is not None:
                deadline = s.next_deadline()
                if deadline is not None and deadline <= self.now:
                    s.handle_timer(self.now)
        self._events()
        links = self.live()
        rng.shuffle(links)
        for link in links:
            if not link.ini_closing:
                link.to_acc += self._pull(self.ini, link.cid, rng.randint(1, budget))
            if self.acc is not None and link.accepted and not link.acc_closing:
                link.to_ini += self._pull(self.acc, link.cid, rng.randint(1, budget))
            self._events()
            self._deliver(link)
            if kill_p and rng.random() < kill_p and not link.dead:
                self.kill(link)
            self._events()
        self._close_finished()
        self._reconnect()

    def _pull(self, session: Session, cid: int, budget: int) -> bytes:
        """What a driver writes: it pulls only when the session says it wants to send."""
        wants = session.wants_to_send(cid, self.now)
        out = b"".join(session.pull(cid, self.now, budget))
        assert wants or not out, "pull had frames that wants_to_send did not announce"
        return out

    def _deliver(self, link: Link) -> None:
        rng = self.rng
        if link.dead:
            return
        if link.to_acc:
            n = rng.randint(1, len(link.to_acc))
            chunk = bytes(link.to_acc[:n])
            del link.to_acc[:n]
            if self.corrupt and rng.random() < 0.05:
                chunk = _flip(chunk, rng)
                self.flips += 1
            self._to_acceptor(link, chunk)
        if link.to_ini and not link.dead:
            n = rng.randint(1, len(link.to_ini))
            chunk = bytes(link.to_ini[:n])
            del link.to_ini[:n]
            self.ini.receive_data(link.cid, chunk, self.now)

    def _to_acceptor(self, link: Link, chunk: bytes) -> None:
        if link.accepted:
            if self.acc is not None and not link.acc_closing:
                self.acc.receive_data(link.cid, chunk, self.now)
            return
        assert link.pre_reader is not None
        try:
            frames = link.pre_reader.feed(chunk)
            if frames:
                session, cid, _new = self.table.accept(frames[0], link.pre_reader, self.now,
                                                       label="sim-a")
                assert cid == link.cid and len(frames) == 1
                self.acc = session
                link.accepted = True
        except TransportError as exc:  # the server refuses the connection, saying why
            self.errors.append(exc)
            link.accepted = True  # nothing more goes to a session on this connection
            link.acc_closing = True
            link.to_acc.clear()
            if not isinstance(exc, ProtocolError) or exc.fatal:
                link.to_ini += SessionTable.refusal(exc, self.ini.session_id)

    def _close_finished(self) -> None:
        """A side that closed after writing: once its bytes are through, the other sees EOF."""
        for link in self.live():
            if link.ini_closing and not link.to_acc:
                if link.acc_closing and not link.to_ini:
                    link.dead = True
                elif self.acc is not None and link.accepted:
                    link.dead = True
                    link.to_ini.clear()
                    self.acc.connection_lost(link.cid, self.now, "EOF")
                elif not link.accepted:
                    link.dead = True
            elif link.acc_closing and not link.to_ini:
                link.dead = True
                link.to_acc.clear()
                self.ini.connection_lost(link.cid, self.now, "EOF")

    def _reconnect(self) -> None:
        if self.ini.needs_connection():
            self.open()
        if self.ini.state not in (SessionState.CONNECTING, SessionState.OPEN):
            return
        while len(self.ini.connection_ids()) < self.target:
            self.open()


def _flip(chunk: bytes, rng: random.Random) -> bytes:
    data = bytearray(chunk)
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def run_transfer(rng: random.Random, *, a_to_b: bytes, b_to_a: bytes, n: int,
                 cfg: SessionConfig, kill_p: float, steps: int = 40000,
                 write_max: int = 10000, budget: int = 3000) -> SimNet:
    """Both sides write their data in random pieces, read at random, then close."""
    net = SimNet(rng, n, cfg, cfg)
    sent = {"a": 0, "b": 0}
    got: dict[str, bytearray] = {"a": bytearray(), "b": bytearray()}
    finished = {"a": False, "b": False}
    eof = {"a": False, "b": False}
    for _ in range(steps):
        killing = kill_p if sent["a"] < len(a_to_b) or sent["b"] < len(b_to_a) else 0.0
        net.step(budget=budget, kill_p=killing)
        assert all(isinstance(e, ChecksumError | BadMagicError | SessionClosedError)
                   for e in net.errors), net.errors
        for side, session, data in (("a", net.ini, a_to_b), ("b", net.acc, b_to_a)):
            if session is None:
                continue
            assert session.send.unacked_bytes <= cfg.send_window
            assert session.recv.held_bytes <= cfg.recv_window
            if sent[side] < len(data):
                piece = data[sent[side]:sent[side] + rng.randint(1, write_max)]
                sent[side] += session.write(piece, net.now)
            elif not finished[side] and session.state is SessionState.OPEN:
                session.finish(net.now)
                finished[side] = True
            if rng.random() < 0.7 and not eof[side]:
                chunk = session.read(rng.choice((None, 1, 100, 5000)))
                if chunk == b"":
                    eof[side] = True
                elif chunk is not None:
                    got[side] += chunk
                    expect = b_to_a if side == "a" else a_to_b
                    assert got[side] == expect[:len(got[side])]  # always a true prefix
        if net.ini.state is SessionState.CLOSED and net.acc is not None and \
                net.acc.state is SessionState.CLOSED:
            break
    assert net.acc is not None
    assert (net.ini.state, net.acc.state) == (SessionState.CLOSED, SessionState.CLOSED), \
        (net.ini.state, net.acc.state, net.ini.stats(), net.acc.stats())
    # A closed session still hands out what arrived before the close.
    for side, session in (("a", net.ini), ("b", net.acc)):
        while (chunk := session.read()) not in (None, b""):
            assert chunk is not None
            got[side] += chunk
        assert session.read() == b""
    assert bytes(got["b"]) == a_to_b
    assert bytes(got["a"]) == b_to_a
    return net


SMALL = SessionConfig(max_payload=512, send_window=4096, recv_window=3072, ack_delay=0.001,
                      ping_interval=0.05, idle_timeout=60, reconnect_timeout=60)


# ---- frames -----------------------------------------------------------------------------------
def test_header_layout() -> None:
    header = encode_header(FrameType.DATA, 0, 0x1122334455667788, 4096, b"xyz")
    assert len(header) == HEADER_SIZE == 40
    assert header[:4] == b"AMST" and header[4] == 1 and header[5] == FrameType.DATA
    assert header[8:16] == bytes.fromhex("1122334455667788")
    assert int.from_bytes(header[16:24], "big") == 4096
    assert int.from_bytes(header[24:28], "big") == 3
    assert int.from_bytes(header[28:36], "big") == zlib.crc32(b"xyz")
    assert int.from_bytes(header[36:40], "big") == zlib.crc32(header[:36])
    if xxh3_64 is not None:
        fast = encode_header(FrameType.DATA, Flag.XXH3, 1, 0, b"xyz")
        assert int.from_bytes(fast[28:36], "big") == xxh3_64(b"xyz")
        assert [bytes(f.payload) for f in FrameReader(64).feed(fast + b"xyz")] == [b"xyz"]


@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=12),
       cuts=st.lists(st.integers(1, 7000), min_size=1, max_size=40),
       staging=st.sampled_from([64, 100, 4096, 65536]))
def test_reader_any_chunking(sizes: list[int], cuts: list[int], staging: int) -> None:
    payloads = [_pattern(n, i) for i, n in enumerate(sizes)]
    stream = b"".join(encode_frame(FrameType.DATA, 0, 7, i, p) for i, p in enumerate(payloads))
    reader = FrameReader(8192, staging_size=staging)
    frames: list[Frame] = []
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        i += 1
        frames += reader.feed(stream[pos:pos + n])
        pos += n
    assert [bytes(f.payload) for f in frames] == payloads
    assert [f.seq for f in frames] == list(range(len(payloads)))


@given(size=st.integers(0, 3000), data=st.data())
def test_any_bit_flip_is_detected(size: int, data: st.DataObject) -> None:
    """Every single-bit error anywhere in a frame is refused, never delivered."""
    frame = bytearray(encode_frame(FrameType.DATA, 0, 9, 0, _pattern(size, size)))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    follow = encode_frame(FrameType.PING, 0, 9, 0, b"\0" * 8) * 200  # what comes after
    reader = FrameReader(4096, peer="b (test)")
    with pytest.raises((ChecksumError, BadMagicError)) as info:  # never anything else
        reader.feed(bytes(frame) + follow)
    assert "peer b (test)" in str(info.value)


def test_bad_headers_are_named() -> None:
    reader = FrameReader(1024, peer="b (10.0.0.2:7000)")
    with pytest.raises(BadMagicError, match=r"peer b \(10.0.0.2:7000\).*not an AMST agent"):
        reader.feed(b"GET / HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\n\r\n")
    frame = bytearray(encode_frame(FrameType.DATA, 0, 1, 0, b"abc"))
    frame[4] = 2
    with pytest.raises(VersionMismatchError, match=r"version 2.*version 1"):
        FrameReader(1024).feed(_recrc(bytes(frame)))
    with pytest.raises(ChecksumError, match=r"header failed.*another version"):
        FrameReader(1024).feed(bytes(frame))  # a flipped version byte is corruption
    big = encode_header(FrameType.DATA, 0, 1, 0, b"x" * 20000)
    with pytest.raises(FrameTooLargeError, match="20000-byte frame"):
        FrameReader(1024).feed(big)  # refused from the header alone: nothing allocated
    with pytest.raises(ChecksumError):
        FrameReader(1024).feed(encode_frame(FrameType.DATA, 0, 1, 0, b"abc")[:-1] + b"d")


# ---- the two stream halves ------------------------------------------------------------------
@given(total=st.integers(1, 20000), seed=st.integers(0, 2**32))
def test_recv_stream_reorders_and_drops_duplicates(total: int, seed: int) -> None:
    rng = random.Random(seed)
    data = _pattern(total, seed)
    send = SendStream(1, window=1 << 20, max_payload=rng.randint(1, 700))
    send.peer_limit = 1 << 30
    assert send.write(data) == total
    frames = []
    while (f := send.next_frame(0)) is not None:
        frames.append((f.seq, bytes(f.payload)))
    # Arrival: shuffled, with duplicates (resends on other connections).
    arrivals = frames + rng.sample(frames, k=min(len(frames), rng.randint(0, 10)))
    rng.shuffle(arrivals)
    recv = RecvStream(window=1 << 20)
    out = bytearray()
    for seq, payload in arrivals:
        recv.on_data(seq, payload, "b")
        while (chunk := recv.read(rng.choice((None, 3)))) not in (None, b""):
            assert chunk is not None
            out += chunk
    assert bytes(out) == data


def test_recv_stream_refuses_what_breaks_the_rules() -> None:
    recv = RecvStream(window=1000)
    with pytest.raises(SequenceError, match="beyond the receive window"):
        recv.on_data(900, b"x" * 200, "b")
    recv.on_data(0, b"a" * 100, "b")
    with pytest.raises(SequenceError, match="overlapping bytes already delivered"):
        recv.on_data(50, b"b" * 100, "b")
    recv.on_data(300, b"c" * 100, "b")
    with pytest.raises(SequenceError, match="overlapping another one"):
        recv.on_data(350, b"d" * 100, "b")
    with pytest.raises(SequenceError, match="two different frames"):
        recv.on_data(300, b"c" * 50, "b")
    with pytest.raises(SequenceError, match="FIN at offset 200 before data"):
        recv.on_fin(200, "b")
    recv.on_fin(400, "b")
    with pytest.raises(SequenceError, match="after its FIN"):
        recv.on_data(400, b"e", "b")
    assert recv.held_bytes == 200


def test_small_frames_do_not_pin_whole_pool_buffers() -> None:
    pool = BufferPool(1 << 20, limit=4)
    small = pool.take(100_000)  # under half a buffer: a buffer of its own size
    assert len(small) == 100_000 and small.obj is not None and small.nbytes == 100_000
    assert len(bytes(small.obj)) == 100_000
    big = pool.take(600_000)  # pooled: a whole buffer, reused once let go
    assert len(big) == 600_000 and len(bytes(big.obj)) == 1 << 20
    first = id(big.obj)
    del big
    again = pool.take(1 << 20)
    assert id(again.obj) == first


def test_send_window_bounds_memory_and_credit_bounds_sending() -> None:
    send = SendStream(1, window=1000, max_payload=100)
    assert send.write(b"x" * 5000) == 1000
    assert send.write(b"y") == 0  # full: backpressure
    send.peer_limit = 250
    sent = [send.next_frame(0) for _ in range(3)]
    assert [f.seq if f else None for f in sent] == [0, 100, None]  # 200..300 > limit 250
    assert send.on_ack(AckInfo(100, 450), False, "b") == 100
    assert send.write(b"z" * 100) == 100 and send.space() == 0
    with pytest.raises(SequenceError, match="only 1100 were sent"):
        send.on_ack(AckInfo(5000, 6000), False, "b")


def test_lost_connection_frames_are_resent_lowest_first() -> None:
    send = SendStream(1, window=10_000, max_payload=100)
    send.peer_limit = 10_000
    send.write(b"q" * 600)
    for conn in (0, 1, 0, 1, 0, 1):
        f = send.next_frame(conn)
        assert f is not None
    send.on_ack(AckInfo(100, 10_000), False, "b")  # frame 0 (conn 0) delivered
    assert send.connection_lost(0) == 2  # frames at 200 and 400 were on conn 0
    resent = [send.next_frame(1) for _ in range(3)]
    assert [f.seq if f else None for f in resent] == [200, 400, None]
    assert send.frames_resent == 2


# ---- whole sessions over the simulated network -----------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a_size=st.integers(0, 30000), b_size=st.integers(0, 8000), n=st.integers(1, 4),
       kill=st.sampled_from([0.0, 0.0, 0.002, 0.01]), seed=st.integers(0, 2**32))
def test_transfer_survives_reordering_and_broken_connections(
        a_size: int, b_size: int, n: int, kill: float, seed: int) -> None:
    rng = random.Random(seed)
    net = run_transfer(rng, a_to_b=_pattern(a_size, seed), b_to_a=_pattern(b_size, ~seed),
                       n=n, cfg=SMALL, kill_p=kill)
    if kill == 0:
        assert net.ini.stats().connections_lost == 0


def test_failover_resends_unacked_frames_of_a_reset_connection() -> None:
    rng = random.Random(5)
    data = _pattern(200_000, 5)
    cfg = SessionConfig(max_payload=1000, send_window=20_000, recv_window=20_000,
                        ping_interval=0.05, idle_timeout=60)
    net = SimNet(rng, 3, cfg, cfg)
    sent, got, killed = 0, bytearray(), 0
    for _ in range(20000):
        net.step(budget=4000)
        if sent < len(data):
            sent += net.ini.write(data[sent:sent + 5000], net.now)
        elif net.ini.send.fin is None:
            net.ini.finish(net.now)
        if net.acc is not None:
            while (chunk := net.acc.read()) not in (None, b""):
                assert chunk is not None
                got += chunk
            if net.acc.at_eof and net.acc.send.fin is None:
                net.acc.finish(net.now)
        # Every 30 KB, reset the connection with the most unacknowledged frames.
        if sent > (killed + 1) * 30_000 and net.acc is not None:
            killed += 1
            on = {link.cid: sum(1 for f in net.ini.send._unacked if f.conn == link.cid)
                  for link in net.live()}
            net.kill(net.links[max(on, key=lambda c: on[c])])
        if net.ini.state is SessionState.CLOSED and net.acc is not None and \
                net.acc.state is SessionState.CLOSED:
            break
    assert bytes(got) == data
    stats = net.ini.stats()
    assert stats.connections_lost >= 5 and stats.frames_resent > 0
    assert stats.connections_opened >= 3 + stats.connections_lost - 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32))
def test_corrupted_frames_drop_the_connection_never_the_data(seed: int) -> None:
    """Bit flips anywhere (header or payload, any frame type, handshakes included) only cost
    the connection they hit: the transfer completes with exactly the bytes sent."""
    rng = random.Random(seed)
    data = _pattern(20000, seed)
    cfg = replace(SMALL, max_corrupt_frames=10_000)
    net = SimNet(rng, 2, cfg, cfg, corrupt=True)
    sent, got = 0, bytearray()
    for _ in range(40000):
        net.step(budget=2000)
        assert all(isinstance(e, ChecksumError | BadMagicError | SessionClosedError)
                   for e in net.errors), net.errors
        if sent < len(data):
            sent += net.ini.write(data[sent:sent + 3000], net.now)
        elif net.ini.send.fin is None:
            net.ini.finish(net.now)
        if net.acc is not None:
            while (chunk := net.acc.read()) not in (None, b""):
                assert chunk is not None
                got += chunk
            assert bytes(got) == data[:len(got)]
            if net.acc.at_eof and net.acc.send.fin is None:
                net.acc.finish(net.now)
        if net.ini.state is SessionState.CLOSED and net.acc is not None and \
                net.acc.state is SessionState.CLOSED:
            break
    else:
        pytest.fail("transfer did not finish")
    assert bytes(got) == data
    # Some seeds corrupt nothing on the way (each delivery is hit with 5 % chance): those say
    # nothing about corruption, so they do not count as examples.
    assume(net.flips > 0)
    assert net.errors  # ... and the corruption was caught


def test_too_much_corruption_fails_the_session() -> None:
    ini, acc, cid = _open_pair()
    for i in range(acc.config.max_corrupt_frames + 1):
        assert acc.state is SessionState.OPEN
        frame = bytearray(encode_frame(FrameType.PING, 0, acc.session_id, 0, bytes(8)))
        frame[-1] ^= 1
        if i:  # reconnect: the initiator's driver would open a replacement
            cid = ini.open_connection(0.1)
            reader = FrameReader(1024)
            hello = reader.feed(b"".join(ini.pull(cid, 0.1, 1 << 20)))[0]
            table = SessionTable(acc.config, "b")
            table.sessions[acc.session_id] = acc
            table.accept(hello, reader, 0.1)
        acc.receive_data(cid, bytes(frame), 0.1)
    assert acc.state is SessionState.FAILED and isinstance(acc.error, ChecksumError)
    assert "corrupted frames, more than the 16 allowed" in str(acc.error)


# ---- handshake and misbehaving peers ---------------------------------------------------------
def _hello(token: bytes, *, index: int = 0, name: str = "a") -> bytes:
    return Hello(Role.INITIATOR, index, 1, 0, 0, 1024, 4096, token, name).encode()


def test_join_needs_the_session_token() -> None:
    table = SessionTable(SessionConfig(max_payload=1024, send_window=4096, recv_window=4096),
                         "b")
    token = b"t" * 32
    first = encode_frame(FrameType.HELLO, Flag.NEW_SESSION, 42, 0, _hello(token))
    reader = table.new_reader("10.0.0.1:1")
    session, cid, new = table.accept(reader.feed(first)[0], reader, 0.0, "10.0.0.1:1")
    assert new and cid == 0 and session.peer_name == "a"
    join = encode_frame(FrameType.HELLO, 0, 42, 0, _hello(b"x" * 32, index=1))
    reader = table.new_reader("10.0.0.1:2")
    with pytest.raises(AuthenticationError, match="wrong token"):
        table.accept(reader.feed(join)[0], reader, 0.0, "10.0.0.1:2")
    unknown = encode_frame(FrameType.HELLO, 0, 43, 0, _hello(token, index=1))
    reader = table.new_reader("10.0.0.1:3")
    with pytest.raises(UnknownSessionError, match="does not have"):
        table.accept(reader.feed(unknown)[0], reader, 0.0, "10.0.0.1:3")
    refusal = FrameReader(4096).feed(SessionTable.refusal(UnknownSessionError("x")))[0]
    assert refusal.type == FrameType.ERROR
    impostor = encode_frame(FrameType.HELLO, 0, 42, 0, _hello(token, index=1, name="c"))
    reader = table.new_reader("10.0.0.1:4")
    with pytest.raises(AuthenticationError, match="claiming to be agent 'c'"):
        table.accept(reader.feed(impostor)[0], reader, 0.0, "10.0.0.1:4")
    reader = table.new_reader("10.0.0.9:5")
    with pytest.raises(AuthenticationError, match=r"certificate is for \['z'\]"):
        table.accept(reader.feed(first)[0], reader, 0.0, "10.0.0.9:5", verified_names=["z"])


def _open_pair() -> tuple[Session, Session, int]:
    cfg = SessionConfig(max_payload=1024, send_window=8192, recv_window=4096)
    ini = Session(Role.INITIATOR, cfg, local_name="a", now=0.0)
    cid = ini.open_connection(0.0, "10.0.0.2:7000")
    table = SessionTable(cfg, "b")
    reader = table.new_reader("10.0.0.1:5000")
    hello = reader.feed(b"".join(ini.pull(cid, 0.0, 1 << 20)))
    acc, acid, _ = table.accept(hello[0], reader, 0.0, "10.0.0.1:5000")
    ini.receive_data(cid, b"".join(acc.pull(acid, 0.0, 1 << 20)), 0.01)
    assert ini.state is SessionState.OPEN
    return ini, acc, cid


@pytest.mark.parametrize(("frame", "error", "text"), [
    (encode_frame(FrameType.DATA, 0, 0, 0, b"x"), HandshakeError, "frame of session 0x0"),
    (None, SequenceError, "beyond the receive window"),
    (encode_frame(FrameType.HELLO, 0, 0, 0, b""), HandshakeError, "already has one"),
    (encode_frame(FrameType.DATA, 0, 0, 0, b"x" * 2048), FrameTooLargeError,
     "2048-byte DATA frame"),
])
def test_misbehaving_peer_fails_the_session_with_a_named_error(
        frame: bytes | None, error: type[Exception], text: str) -> None:
    ini, acc, cid = _open_pair()
    if frame is None:  # data far beyond the announced window
        frame = encode_frame(FrameType.DATA, 0, acc.session_id, 10_000, b"y" * 100)
    elif frame[8:16] == bytes(8) and frame[:4] == b"AMST":
        frame = frame[:8] + acc.session_id.to_bytes(8, "big") + frame[16:] \
            if error is not HandshakeError or "session" not in text else frame
        frame = _recrc(frame)
    acc.receive_data(cid, frame, 0.02)
    assert acc.state is SessionState.FAILED
    assert isinstance(acc.error, error), acc.error
    assert text in str(acc.error) and "peer a (10.0.0.1:5000, connection 0)" in str(acc.error)
    with pytest.raises(error):
        acc.read()
    # The peer is told why, in an ERROR frame, and fails with that message.
    ini.receive_data(cid, b"".join(acc.pull(cid, 0.02, 1 << 20)), 0.03)
    assert ini.state is SessionState.FAILED and isinstance(ini.error, PeerError)
    assert text in str(ini.error)


def _recrc(frame: bytes) -> bytes:
    """The frame with its sums made valid again (a peer that means what it sends)."""
    length = int.from_bytes(frame[24:28], "big")
    payload = frame[HEADER_SIZE:HEADER_SIZE + length]
    prefix = frame[:28] + zlib.crc32(payload).to_bytes(8, "big")
    return prefix + zlib.crc32(prefix).to_bytes(4, "big") + frame[HEADER_SIZE:]


def test_garbage_or_corruption_costs_only_the_connection() -> None:
    _, acc, cid = _open_pair()
    acc.receive_data(cid, b"\x16\x03\x01\x02\x00\x01\x00\x01" * 8, 0.02)  # a TLS hello
    assert acc.state is SessionState.OPEN
    dropped = [e for e in acc.events() if isinstance(e, ConnectionDropped)]
    assert len(dropped) == 1 and not dropped[0].clean
    assert isinstance(dropped[0].error, BadMagicError)
    assert "uses TLS and the other does not" in str(dropped[0].error)
    assert acc.stats().corrupt_frames == 1


def test_fin_is_acknowledged_and_both_sides_close() -> None:
    ini, acc, cid = _open_pair()
    assert ini.write(b"hello", 0.1) == 5
    ini.finish(0.1)
    t = 0.1
    for _ in range(10):
        t += 0.01
        acc.receive_data(cid, b"".join(ini.pull(cid, t, 1 << 20)), t)
        if acc.read() == b"hello":
            assert acc.read() == b""
            acc.finish(t)
        ini.receive_data(cid, b"".join(acc.pull(cid, t, 1 << 20)), t)
    assert ini.state is SessionState.CLOSED and acc.state is SessionState.CLOSED
    assert ini.stats().bytes_acked == 5


# ---- windows that bound a relay's backlog ------------------------------------------------------
def test_delivery_window_follows_rate_times_rtt_within_floor_and_cap() -> None:
    mib = 1 << 20
    wan = DeliveryWindow(4 * mib, 64 * mib)
    assert wan.on_ack(0, 0.0, 0.05) is None  # the first ACK only marks the start
    assert wan.on_ack(1_000_000, 0.01, 0.05) is None  # shorter than an RTT: no sample
    # 50 MB/s for 0.1 s at 50 ms: 2 x 50e6 x 0.05 = 5 MB
    assert wan.on_ack(5_000_000, 0.1, 0.05) == 5_000_000
    assert wan.on_ack(5_000_000 + 20_000_000, 0.2, 0.05) == 20_000_000  # 200 MB/s
    # the application pauses: the best rate of the last second keeps the window...
    assert wan.on_ack(25_000_000, 0.5, 0.05) == 20_000_000
    assert wan.on_ack(25_000_000, 1.1, 0.05) == 20_000_000
    # ...until it is older than a second; then the floor
    assert wan.on_ack(25_000_000, 1.3, 0.05) == 4 * mib
    # a rate beyond what the cap allows stops at the cap
    assert wan.on_ack(25_000_000 + 10**9, 2.3, 0.05) == 64 * mib
    lan = DeliveryWindow(4 * mib, 8 * mib)
    lan.on_ack(0, 0.0, 0.0002)
    assert lan.on_ack(400_000_000, 1.0, 0.0002) == 4 * mib  # 400 MB/s x 0.2 ms: the floor
    with pytest.raises(ValueError):
        DeliveryWindow(8 * mib, 4 * mib)


def test_lowered_windows_hold_back_writes_and_credit_never_goes_back() -> None:
    ini, acc, _cid = _open_pair()
    assert ini.set_send_window(10**12) == ini.config.send_window  # at most the configured
    assert ini.set_send_window(1) == ini.config.max_payload  # at least one frame
    taken = ini.write(b"x" * (3 * ini.config.max_payload), 0.0)
    assert taken == ini.config.max_payload and ini.send_space() == 0
    assert ini.write(b"y", 0.0) == 0  # waits for an ACK
    limit = acc.recv.limit
    assert acc.set_recv_window(2 * acc.config.max_payload) == 2 * acc.config.max_payload
    acc.recv.consumed += 1  # as if one byte was read
    assert acc.recv.ack_info().limit == limit  # an announced limit is never taken back
    acc.recv.consumed += limit
    assert acc.recv.ack_info().limit == acc.recv.consumed + 2 * acc.config.max_payload
