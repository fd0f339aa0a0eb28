"""``dwcp hooks install``: put the libvirt qemu hook in place."""

from __future__ import annotations

import re
from pathlib import Path

import click

from dwcp_migrate.cli.agent_cmds import config_option
from dwcp_migrate.paths import REPO_ROOT

HOOK_SOURCE_CANDIDATES = (REPO_ROOT / "hooks" / "qemu", Path("/usr/share/dwcp-migrate/hooks/qemu"))


def hook_source() -> Path:
    for path in HOOK_SOURCE_CANDIDATES:
        if path.is_file():
            return path
    raise click.ClickException("the hook script is not installed (looked in "
                               + ", ".join(map(str, HOOK_SOURCE_CANDIDATES)) + ")")


def render_hook(admin_socket: Path) -> str:
    text = hook_source().read_text()
    rendered, count = re.subn(r'^ADMIN_SOCKET = .*$',
                              f'ADMIN_SOCKET = os.environ.get("DWCP_ADMIN_SOCKET", '
                              f'"{admin_socket}")  # set by dwcp hooks install',
                              text, count=1, flags=re.M)
    if count != 1:
        raise click.ClickException(f"{hook_source()} has no ADMIN_SOCKET line to fill in")
    return rendered


@click.group()
def hooks() -> None:
    """The libvirt qemu hook (admission control for incoming migrations)."""


@hooks.command("install")
@config_option
@click.option("--hooks-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/libvirt/hooks"), show_default=True,
              help="libvirt's hook directory.")
def install(config_path: Path, hooks_dir: Path) -> None:
    """Install the hook as HOOKS_DIR/qemu.d/dwcp (restart libvirtd to load it)."""
    from dwcp_migrate.agent.config import load_config

    cfg = load_config(config_path)
    target = hooks_dir / "qemu.d" / "dwcp"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(render_hook(cfg.admin_socket))
    tmp.chmod(0o755)
    tmp.replace(target)
    click.echo(f"installed {target} (asks the agent at {cfg.admin_socket}); restart libvirtd "
               "so that it reads its hooks")
