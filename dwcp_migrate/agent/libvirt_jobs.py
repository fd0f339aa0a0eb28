"""Migrations the agent starts through libvirt (``dwcp migrate DOM --to HOST``).

libvirt does the orchestration (destination QEMU, switchover, cleanup); the agent asks it to
use the unix-socket migration URI of the peer, so the stream flows through the agents. The
blocking libvirt calls run in a worker thread; progress comes from ``virDomainGetJobStats``.
A failure is libvirt's: the domain keeps running on the source and the error says why.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import libvirt

from dwcp_migrate.errors import MigrationError

log = logging.getLogger(__name__)

LOCAL_URI = "qemu:///system"


@dataclass
class LibvirtJob:
    id: str
    domain: str
    peer: str
    dest_uri: str
    migrate_uri: str
    started: float = field(default_factory=time.time)
    ended: float | None = None
    state: str = "starting"  # starting | running | completed | failed
    error: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "domain": self.domain, "peer": self.peer,
                "dest_uri": self.dest_uri, "migrate_uri": self.migrate_uri,
                "started": self.started, "ended": self.ended, "state": self.state,
                "error": self.error, "progress": self.progress,
                "elapsed_s": (self.ended or time.time()) - self.started}


def _libvirt_error(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc)


def check_domain(domain: str) -> None:
    """Raise a clear error unless ``domain`` exists and runs here (nothing is changed)."""
    try:
        conn = libvirt.open(LOCAL_URI)
    except libvirt.libvirtError as exc:
        raise MigrationError(f"cannot reach the local libvirt ({LOCAL_URI}): "
                             f"{_libvirt_error(exc)}") from exc
    try:
        dom = conn.lookupByName(domain)
        state, _ = dom.state()
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            raise MigrationError(f"domain {domain} is not running here (state {state}); "
                                 "only running domains can be live-migrated")
    except libvirt.libvirtError as exc:
        raise MigrationError(f"no domain {domain!r} on this host: "
                             f"{_libvirt_error(exc)}") from exc
    finally:
        conn.close()


class LibvirtMigrator:
    """Runs libvirt migrations in worker threads and keeps their progress."""

    def __init__(self) -> None:
        self.jobs: dict[str, LibvirtJob] = {}
        self._lock = threading.Lock()

    def start(self, domain: str, peer: str, dest_uri: str, migrate_uri: str,
              bandwidth_mib: int | None = None) -> LibvirtJob:
        check_domain(domain)
        with self._lock:
            busy = [j for j in self.jobs.values()
                    if j.domain == domain and j.state in ("starting", "running")]
            if busy:
                raise MigrationError(f"domain {domain} is already migrating (job {busy[0].id})")
            job = LibvirtJob(uuid.uuid4().hex[:12], domain, peer, dest_uri, migrate_uri)
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, bandwidth_mib), daemon=True,
                         name=f"migrate-{domain}").start()
        return job

    def _run(self, job: LibvirtJob, bandwidth_mib: int | None) -> None:
        conn = None
        try:
            conn = libvirt.open(LOCAL_URI)
            dom = conn.lookupByName(job.domain)
            params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: job.migrate_uri}
            if bandwidth_mib:
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
            flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
            poller = threading.Thread(target=self._poll, args=(job,), daemon=True)
            job.state = "running"
            poller.start()
            log.info("migrating %s to %s via %s (%s)", job.domain, job.peer, job.dest_uri,
                     job.migrate_uri)
            dom.migrateToURI3(job.dest_uri, params, flags)
            job.state = "completed"
        except libvirt.libvirtError as exc:
            job.error = (f"libvirt could not migrate {job.domain} to {job.peer}: "
                         f"{_libvirt_error(exc)}; the domain keeps running here")
            job.state = "failed"
            log.error("%s", job.error)
        except Exception as exc:  # a worker thread must report, not vanish
            job.error = f"migration of {job.domain} failed: {exc}"
            job.state = "failed"
            log.exception("migration job %s", job.id)
        finally:
            job.ended = time.time()
            if conn is not None:
                conn.close()

    def _poll(self, job: LibvirtJob) -> None:
        """Job statistics every half second while the migration runs."""
        try:
            conn = libvirt.open(LOCAL_URI)
        except libvirt.libvirtError:
            return
        try:
            dom = conn.lookupByName(job.domain)
            while job.state == "running":
                try:
                    stats = dom.jobStats()
                except libvirt.libvirtError:
                    break
                if stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
                    job.progress = {k: stats[k] for k in (
                        "memory_processed", "memory_remaining", "memory_total",
                        "memory_iteration", "memory_dirty_rate", "memory_bps", "data_processed",
                        "data_remaining", "data_total", "time_elapsed", "downtime")
                        if k in stats}
                time.sleep(0.5)
        finally:
            conn.close()
