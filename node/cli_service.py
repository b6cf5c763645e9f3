"""`allerac service install [--user] [--print]` and `allerac service uninstall [--user]`:
run the node as a systemd service (the unit: `node/service_unit.py`)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from mesh.errors import MeshError
from node.cli_options import home_option
from node.service_unit import UNIT_NAME, ServiceUnit, unit_dir, unit_file_name
from node.store.home import Home

SYSTEMCTL_TIMEOUT_S = 120.0


def _allerac_command() -> tuple[str, ...]:
    """How the service starts this same installation: the `allerac` script next to this
    Python (a venv's bin/), else `python -m node`."""
    python = Path(sys.executable).absolute()
    script = python.parent / "allerac"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (str(python), "-m", "node")


def _systemctl(user: bool) -> list[str]:
    path = shutil.which("systemctl")
    if path is None:
        raise click.ClickException(
            "systemctl was not found: this system does not run systemd, so there is no "
            "service to install. `allerac service install --print` shows the unit, to "
            "adapt by hand; or start the node with `allerac up`"
        )
    return [path, *(["--user"] if user else [])]


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(  # noqa: S603 - systemctl, found on PATH, with our arguments
            command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise click.ClickException(f"{' '.join(command)} failed: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise click.ClickException(f"{' '.join(command)} failed: {said}")


@click.group()
def service() -> None:
    """Run the node as a systemd service: started at boot, restarted when it fails."""


user_option = click.option(
    "--user",
    "user_unit",
    is_flag=True,
    help="A user service (~/.config/systemd/user), not a system one (/etc/systemd/system).",
)
name_option = click.option(
    "--name",
    default=UNIT_NAME,
    show_default=True,
    help="The unit's name (several nodes on one machine: one name per data dir).",
)


@service.command("install")
@home_option
@user_option
@name_option
@click.option("--print", "print_only", is_flag=True, help="Print the unit; install nothing.")
def service_install(home_dir: Path | None, user_unit: bool, name: str, print_only: bool) -> None:
    """Install the node as a service, enable it at boot and start it now."""
    home = Home.resolve(home_dir)
    unit = ServiceUnit(
        command=_allerac_command(),
        home=home.root,
        user=None if user_unit else getpass.getuser(),
        name=name,
    )
    try:
        text = unit.text()
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    if print_only:
        click.echo(text, nl=False)
        return
    systemctl = _systemctl(user_unit)  # before anything is written
    directory = unit_dir(user=user_unit)
    path = directory / unit.file_name
    try:
        home.ensure()  # ReadWritePaths= must exist when the service starts
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)  # a unit is configuration, not a secret: systemd reads it
        tmp.replace(path)
    except PermissionError as exc:
        raise click.ClickException(
            f"cannot write {path}: permission denied. A system service needs root "
            "(sudo allerac service install), or install a user service with --user"
        ) from exc
    except (OSError, MeshError) as exc:
        raise click.ClickException(f"cannot write {path}: {exc}") from exc
    _run([*systemctl, "daemon-reload"])
    _run([*systemctl, "enable", "--now", unit.file_name])
    click.echo(
        f"Installed {path}; the node runs as service {unit.file_name} (data dir {home.root})."
    )
    scope, log = ("--user ", "--user-unit") if user_unit else ("", "-u")
    click.echo(f"  status:  systemctl {scope}status {unit.file_name}", err=True)
    click.echo(f"  log:     journalctl {log} {unit.file_name} -f", err=True)
    if user_unit:
        click.echo(
            f"  to run it while you are logged out: loginctl enable-linger {getpass.getuser()}",
            err=True,
        )


@service.command("uninstall")
@user_option
@name_option
def service_uninstall(user_unit: bool, name: str) -> None:
    """Stop the service, disable it and remove its unit (the data dir stays)."""
    try:
        file_name = unit_file_name(name)
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    path = unit_dir(user=user_unit) / file_name
    if not path.is_file():
        raise click.ClickException(
            f"no {file_name} installed at {path}"
            + ("" if user_unit else " (a user service? add --user)")
        )
    systemctl = _systemctl(user_unit)
    _run([*systemctl, "disable", "--now", file_name])
    try:
        path.unlink()
    except PermissionError as exc:
        raise click.ClickException(f"cannot remove {path}: permission denied (sudo?)") from exc
    _run([*systemctl, "daemon-reload"])
    click.echo(f"Stopped and removed {file_name} ({path}); the data dir was left as it was.")
