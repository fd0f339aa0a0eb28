"""``dwcp agent``, ``dwcp status``, ``dwcp config check``: thin, over the agent library."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import click

from dwcp_migrate.agent.config import AgentConfig, load_config

DEFAULT_CONFIG = Path("/etc/dwcp/agent.yaml")
config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG, show_default=True, help="The agent's configuration file.")

log = logging.getLogger(__name__)


def dump_tasks() -> None:
    """SIGUSR1: write every asyncio task's and thread's stack to the log (for a stuck agent)."""
    import faulthandler
    import io
    import sys

    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"--- {task!r}\n")
        task.print_stack(file=out)
    log.warning("task dump on SIGUSR1:\n%s", out.getvalue())
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


@click.command()
@config_option
def agent(config_path: Path) -> None:
    """Run the agent (the daemon the dwcp-agent service starts)."""
    from dwcp_migrate.agent.daemon import Agent

    config = load_config(config_path)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)  # a daemon reports what it does

    async def run() -> None:
        daemon = Agent(config)
        await daemon.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        click.echo(f"dwcp agent {config.name} ready", err=True)
        await stop.wait()
        log.info("agent %s stopping", config.name)
        await daemon.stop()

    asyncio.run(run())


def _client(config_path: Path) -> Any:
    from dwcp_migrate.agent.admin import AdminClient

    return AdminClient(load_config(config_path).admin_socket)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _row(m: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.get("started", 0)))
    moved = m.get("bytes_from_qemu") or m.get("bytes_to_qemu") or 0
    return (f"{m.get('id', '?'):12}  {m.get('role', '?'):11}  {m.get('peer', '?'):10}  "
            f"{when}  {m.get('duration_s', 0):7.1f} s  {_fmt_bytes(moved):>10}  "
            f"{_fmt_bytes(m.get('wire_bytes', 0)):>10}  {m.get('mode') or '-':11}  "
            f"{m.get('result', '?')}" + (f": {m['error']}" if m.get("error") else ""))


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the agent's answer as JSON.")
def status(config_path: Path, as_json: bool) -> None:
    """This host's active and recent migrations."""
    answer = _client(config_path).call("status")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"agent {answer['name']}, peers: {', '.join(answer['peers']) or 'none'}")
    head = (f"{'id':12}  {'role':11}  {'peer':10}  {'started':19}  {'time':>9}  "
            f"{'QEMU bytes':>10}  {'wire bytes':>10}  {'mode':11}  result")
    for title, items in (("active", answer["active"]), ("recent", answer["recent"][::-1])):
        click.echo(f"\n{title} migrations: {len(items)}")
        if items:
            click.echo(head)
            for m in items:
                click.echo(_row(m))


@click.group()
def config() -> None:
    """Check the agent's configuration."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path),
                default=DEFAULT_CONFIG)
def config_check(path: Path) -> None:
    """Validate a configuration file: prints a summary, or the first problem and its key."""
    cfg: AgentConfig = load_config(path)
    security = "mutual TLS" if cfg.security.tls else "PLAINTEXT (configured explicitly)"
    click.echo(f"{path}: ok\n  name: {cfg.name}\n  listen: {cfg.listen_host}:{cfg.listen_port}"
               f"\n  peers: " + (", ".join(f"{p.name}={p.host}:{p.port}"
                                          for p in cfg.peers.values()) or "none") +
               f"\n  security: {security}\n  socket_dir: {cfg.socket_dir}"
               f"\n  codec mode: {cfg.codec.mode}; transport streams: "
               f"{cfg.transport.streams or 'auto (by path mode)'}; congestion control: "
               f"{cfg.transport.congestion_control or 'system default'}")
