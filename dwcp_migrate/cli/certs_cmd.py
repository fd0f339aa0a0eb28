"""``dwcp certs``: a lab CA and agent certificates for the transport's mutual TLS."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("certs"), show_default=True,
              help="Directory for ca.pem/ca.key and <name>.pem/<name>.key; an existing CA "
                   "there is reused.")
@click.option("--ip", "ips", multiple=True, metavar="NAME=ADDRESS",
              help="Also put ADDRESS in NAME's certificate (repeatable). Agents are checked "
                   "by name; this is for tools that connect by address.")
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True,
              help="Validity of the agent certificates.")
def certs(names: tuple[str, ...], out_dir: Path, ips: tuple[str, ...], days: int) -> None:
    """Make a lab CA (unless OUT has one) and a certificate for each agent NAME.

    Each certificate names its agent (DNS subjectAltName = NAME) and serves both ends of a
    session. Give every host its own NAME.pem and NAME.key and the shared ca.pem (never
    ca.key), and point the agent's tls.cert, tls.key and tls.ca settings at them.
    """
    from dwcp_migrate.errors import ConfigError
    from dwcp_migrate.transports.certs import issue, load_or_make_ca

    addresses: dict[str, list[str]] = {}
    for item in ips:
        name, sep, addr = item.partition("=")
        if not sep or name not in names:
            raise click.BadParameter(f"{item!r}: expected NAME=ADDRESS with NAME among "
                                     f"{', '.join(names)}", param_hint="--ip")
        addresses.setdefault(name, []).append(addr)
    try:
        had_ca = (out_dir / "ca.pem").exists()
        ca = load_or_make_ca(out_dir)
        click.echo(f"{'using' if had_ca else 'made'} CA {out_dir / 'ca.pem'} "
                   f"(key {out_dir / 'ca.key'}: keep it off the hosts)")
        for name in names:
            issued = issue(out_dir, name, addresses=addresses.get(name), days=days, ca=ca)
            click.echo(f"agent {name}: {issued.cert} {issued.key}")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
