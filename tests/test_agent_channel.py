"""The agent channel's message framing: any chunking of a message stream yields the same
messages (payloads taken as views where they can be), and a misbehaving peer's bytes are
refused with a clear error."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_migrate.agent.channel import (
    HEADER,
    MAX_MESSAGE,
    ChannelProtocolError,
    MessageReader,
    MessageType,
    encode,
    encode_joined,
)
from dwcp_migrate.agent.datapath import _gathered

messages = st.lists(st.tuples(st.sampled_from(list(MessageType)),
                              st.binary(max_size=3000)), max_size=12)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=20))
def test_any_chunking_gives_the_same_messages(msgs: list[tuple[MessageType, bytes]],
                                              cuts: list[int]) -> None:
    stream = b"".join(b"".join(encode(t, p)) for t, p in msgs)
    reader = MessageReader()
    got = []
    for chunk in _cut(stream, cuts):
        got += reader.feed(chunk)
    assert [(m.type, bytes(m.payload)) for m in got] == msgs
    assert reader.pending == 0


def test_header_then_whole_payload_is_not_copied() -> None:
    reader = MessageReader()
    header, payload = encode(MessageType.BATCH, b"x" * 100_000)
    assert reader.feed(header) == []
    (msg,) = reader.feed(payload)
    assert isinstance(msg.payload, memoryview) and msg.payload.obj is payload


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=6), st.integers(0, 20_000))
def test_a_joined_message_is_the_parts_in_one(parts: list[bytes], cut: int) -> None:
    joined = encode_joined(MessageType.RAW, [memoryview(p) for p in parts])
    assert joined == b"".join(encode(MessageType.RAW, b"".join(parts)))
    reader = MessageReader()
    at = cut % (len(joined) + 1)
    got = reader.feed(joined[:at]) + reader.feed(joined[at:])
    assert [(m.type, bytes(m.payload)) for m in got] == [(MessageType.RAW, b"".join(parts))]


def test_a_joined_message_over_the_limit_is_refused() -> None:
    part = memoryview(bytes(MAX_MESSAGE // 2 + 1))
    with pytest.raises(ChannelProtocolError, match="exceeds"):
        encode_joined(MessageType.RAW, [part, part])


def test_truncated_message_is_pending() -> None:
    reader = MessageReader()
    data = b"".join(encode(MessageType.RAW, b"abcdef"))
    assert reader.feed(data[:-2]) == []
    assert reader.pending == len(data) - 2


@pytest.mark.parametrize("raw,match", [
    (HEADER.pack(99, 0), "unknown message type 99"),
    (HEADER.pack(MessageType.RAW, MAX_MESSAGE + 1), "exceeds|misbehaving"),
])
def test_misbehaving_peer_is_refused(raw: bytes, match: str) -> None:
    with pytest.raises(ChannelProtocolError, match=match):
        MessageReader().feed(raw)
    reader = MessageReader()  # also when the header arrives in pieces
    with pytest.raises(ChannelProtocolError, match=match):
        for i in range(len(raw)):
            reader.feed(raw[i:i + 1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8), st.integers(1, 4000))
def test_read_ahead_is_gathered_into_full_messages_in_order(chunks: list[bytes],
                                                            limit: int) -> None:
    groups = _gathered(chunks, limit)
    assert b"".join(b"".join(g) for g in groups) == b"".join(chunks)
    sizes = [sum(map(len, g)) for g in groups]
    assert all(s == limit for s in sizes[:-1]) and all(0 < s <= limit for s in sizes)
