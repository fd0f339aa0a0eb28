"""``dwcp migrate DOM --to HOST``: a libvirt live migration through the agents."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from dwcp_migrate.cli.agent_cmds import _client, _fmt_bytes, config_option


def _progress_line(job: dict[str, Any], record: dict[str, Any] | None) -> str:
    p = job.get("progress") or {}
    total = p.get("data_total") or p.get("memory_total") or 0
    processed = p.get("data_processed") or p.get("memory_processed") or 0
    remaining = p.get("data_remaining") or p.get("memory_remaining") or 0
    bps = p.get("memory_bps") or 0
    elapsed = job.get("elapsed_s", 0.0)
    if not bps and elapsed > 0:
        bps = processed / elapsed
    eta = f"{remaining / bps:5.1f} s" if bps and remaining else "   - "
    pct = f"{100 * processed / total:5.1f}%" if total else "  -  "
    wire = _fmt_bytes(record.get("wire_bytes", 0)) if record else "-"
    return (f"{job['domain']} -> {job['peer']}: {pct}  {_fmt_bytes(processed):>10} sent by "
            f"QEMU, {wire:>10} on the wire, {bps * 8 / 1e6:7.1f} Mbit/s, iteration "
            f"{p.get('memory_iteration', '-')}, ETA {eta}")


@click.command()
@click.argument("domain")
@click.option("--to", "to", required=True, metavar="HOST", help="The peer host (agent name).")
@click.option("--bandwidth", "bandwidth_mib", type=click.IntRange(1), default=None,
              help="Cap QEMU's migration bandwidth, MiB/s (default: unlimited).")
@config_option
def migrate(domain: str, to: str, bandwidth_mib: int | None, config_path: Path) -> None:
    """Live-migrate DOMAIN to HOST through the dwcp agents, with progress and a summary.

    libvirt orchestrates it (peer to peer); the stream goes through this host's agent, which
    carries it to HOST's agent. If anything fails, the domain keeps running here and the
    error says why.
    """
    client = _client(config_path)
    job = client.call("migrate", domain=domain, to=to, bandwidth_mib=bandwidth_mib)["job"]
    tty = sys.stdout.isatty()
    last = 0.0
    while True:
        answer = client.call("job", id=job["id"])
        job, record = answer["job"], answer.get("record")
        if job["state"] in ("completed", "failed"):
            break
        now = time.monotonic()
        if tty:
            click.echo("\r" + _progress_line(job, record)[:200].ljust(120), nl=False)
        elif now - last >= 2:
            click.echo(_progress_line(job, record))
            last = now
        time.sleep(0.5)
    if tty:
        click.echo("")
    if job["state"] == "failed":
        raise click.ClickException(job["error"] or "the migration failed")
    summary = [f"migrated {domain} to {to} in {job['elapsed_s']:.1f} s"]
    if record:
        moved, wire = record.get("bytes_from_qemu", 0), record.get("wire_bytes", 0)
        ratio = f" ({wire / moved:.2f}x)" if moved else ""
        summary.append(f"QEMU stream {_fmt_bytes(moved)}, on the wire {_fmt_bytes(wire)}"
                       f"{ratio}, data path: {record.get('mode')} ({record.get('mode_reason')})")
    click.echo("\n".join(summary))
