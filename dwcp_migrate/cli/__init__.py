"""The ``dwcp`` command. Thin: every command calls library code that tests use too."""

from __future__ import annotations

import logging
import sys

import click

from dwcp_migrate import __version__
from dwcp_migrate.cli.agent_cmds import agent, config, status
from dwcp_migrate.cli.certs_cmd import certs
from dwcp_migrate.cli.hooks_cmd import hooks
from dwcp_migrate.cli.migrate_cmd import migrate
from dwcp_migrate.cli.stream_cmds import stream
from dwcp_migrate.cli.testbed_cmds import demo, testbed
from dwcp_migrate.errors import DwcpError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dwcp")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """dwcp-migrate: live migration of libvirt/QEMU guests, faster and with fewer bytes.

    On a hypervisor: `agent` (the daemon), `migrate` and `status` (through the local agent),
    `hooks`, `certs`, `config`. Offline: `stream` (QEMU migration streams). For trying it:
    `testbed` (local test hosts with an emulated WAN) and `demo`.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


cli.add_command(agent)
cli.add_command(migrate)
cli.add_command(hooks)
cli.add_command(certs)
cli.add_command(status)
cli.add_command(config)
cli.add_command(demo)
cli.add_command(testbed)
cli.add_command(stream)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DwcpError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
