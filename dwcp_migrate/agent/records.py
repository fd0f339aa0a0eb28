"""Per-migration records: what the agent saw and how each migration ended.

A record lives in memory while its migration runs and is appended to
``<state_dir>/migrations.jsonl`` when it ends, so ``dwcp status`` shows recent migrations
after an agent restart too.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECENT = 50  # finished migrations kept for `dwcp status`


@dataclass
class ChannelCounters:
    index: int
    bytes_from_qemu: int = 0  # source: read from the source QEMU
    bytes_to_qemu: int = 0  # destination: written to the destination QEMU
    wire_bytes: int = 0  # message bytes handed to the transport (before TCP/TLS overhead)
    return_bytes: int = 0  # QEMU's return path, destination to source


@dataclass
class MigrationRecord:
    id: str
    role: str  # "source" or "destination"
    peer: str
    domain: str | None = None
    mode: str | None = None  # "encode" or "passthrough"
    mode_reason: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    result: str = "running"  # running | completed | failed
    error: str | None = None
    iterations: int | None = None
    channels: list[ChannelCounters] = field(default_factory=list)
    codec: dict[str, Any] = field(default_factory=dict)
    transport: dict[str, Any] = field(default_factory=dict)  # channel -> session statistics

    @classmethod
    def new(cls, role: str, peer: str, migration_id: str | None = None) -> MigrationRecord:
        return cls(id=migration_id or uuid.uuid4().hex[:12], role=role, peer=peer)

    def channel(self, index: int) -> ChannelCounters:
        for ch in self.channels:
            if ch.index == index:
                return ch
        ch = ChannelCounters(index)
        self.channels.append(ch)
        return ch

    @property
    def bytes_from_qemu(self) -> int:
        return sum(c.bytes_from_qemu for c in self.channels)

    @property
    def bytes_to_qemu(self) -> int:
        return sum(c.bytes_to_qemu for c in self.channels)

    @property
    def wire_bytes(self) -> int:
        return sum(c.wire_bytes for c in self.channels)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(bytes_from_qemu=self.bytes_from_qemu, bytes_to_qemu=self.bytes_to_qemu,
                   wire_bytes=self.wire_bytes,
                   duration_s=(self.ended or time.time()) - self.started)
        return out


class MigrationLog:
    """Active and recent migrations of this agent."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "migrations.jsonl"
        self.active: dict[str, MigrationRecord] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text().splitlines()[-RECENT:]
        except FileNotFoundError:
            return
        for line in lines:
            try:
                self.recent.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring a damaged line in %s", self.path)

    def start(self, record: MigrationRecord) -> MigrationRecord:
        self.active[record.id] = record
        log.info("migration %s (%s) with %s started", record.id, record.role, record.peer)
        return record

    def finish(self, record: MigrationRecord, error: str | None = None) -> None:
        if record.ended is not None:
            return
        record.ended = time.time()
        record.result = "failed" if error else "completed"
        record.error = error
        self.active.pop(record.id, None)
        entry = record.to_json()
        self.recent.append(entry)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as exc:
            log.error("cannot write the migration record to %s: %s", self.path, exc)
        if error:
            log.error("migration %s (%s) with %s failed: %s", record.id, record.role,
                      record.peer, error)
        else:
            log.info("migration %s (%s) with %s completed: %d bytes from QEMU, %d on the wire",
                     record.id, record.role, record.peer, record.bytes_from_qemu,
                     record.wire_bytes)

    def snapshot(self) -> dict[str, Any]:
        return {"active": [r.to_json() for r in self.active.values()],
                "recent": list(self.recent)}
