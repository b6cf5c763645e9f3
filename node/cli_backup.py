"""`allerac backup create FILE` and `allerac backup restore FILE [--home DIR] [--force]`."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import click

from mesh.errors import MeshError
from node.cli_options import home_option
from node.store.home import Home

PASSPHRASE_ENV = "ALLERAC_BACKUP_PASSPHRASE"  # noqa: S105 - the variable's name


def _passphrase(*, confirm: bool) -> str:
    """From $ALLERAC_BACKUP_PASSPHRASE, else asked at the terminal (twice when making one)."""
    given = os.environ.get(PASSPHRASE_ENV)
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise click.ClickException(
            f"no passphrase: set ${PASSPHRASE_ENV} or run this at a terminal to be asked"
        )
    return str(
        click.prompt("Backup passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    )


@click.group()
def backup() -> None:
    """Back up this node's keys, mesh, users, config and ledger; restore them on a new box."""


@backup.command("create")
@home_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup_create(home_dir: Path | None, file: Path) -> None:
    """Write an encrypted backup of the node to FILE (safe while the node runs). It holds
    the mesh key on an admin: keep the passphrase apart from it."""
    from node.store.backup import create_backup
    from node.store.backup_file import check_passphrase

    home = Home.resolve(home_dir)
    try:
        if not home.identity_key.is_file():  # before asking for a passphrase
            raise click.ClickException(
                f"no node identity in {home.root}: nothing to back up (check --home)"
            )
        passphrase = _passphrase(confirm=True)
        check_passphrase(passphrase)
        summary = create_backup(home, file, passphrase)
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(
        f"Backed up node {summary.node_id} (mesh {summary.mesh_id or '?'}, "
        f"{summary.ledger_records} ledger records, {len(summary.files)} files) to {file}."
    )


@backup.command("restore")
@home_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--force",
    is_flag=True,
    help="Replace the identity already in the data dir (its files are kept in replaced-TIME/).",
)
def backup_restore(home_dir: Path | None, file: Path, force: bool) -> None:
    """Restore the backup FILE into the data dir (which must not hold another identity
    unless --force); then `allerac up` starts it as the same node with the same ledger."""
    from node.store.backup import check_restorable, restore_backup

    home = Home.resolve(home_dir)
    try:
        check_restorable(home, force=force)  # before asking for a passphrase
        summary = restore_backup(file, home, _passphrase(confirm=False), force=force)
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    made = datetime.datetime.fromtimestamp(summary.created_at_ms / 1000, datetime.UTC)
    click.echo(
        f"Restored node {summary.node_id} (mesh {summary.mesh_id or '?'}, "
        f"{summary.ledger_records} ledger records, backed up {made:%Y-%m-%d %H:%M} UTC) "
        f"into {home.root}. Start it with: allerac up --home {home.root}"
    )
