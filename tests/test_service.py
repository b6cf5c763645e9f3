"""`allerac service install/uninstall` (issue 17, item 1): the systemd unit, checked by
systemd's own `systemd-analyze verify`, and installing and removing it through `systemctl`
(a stand-in on PATH that records its calls: no systemd runs in the test machines), or
without any systemctl at all."""

from __future__ import annotations

import getpass
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from node.cli import cli

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def allerac(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def unit_text(home: Path, *extra: str) -> str:
    result = allerac("service", "install", "--print", "--home", str(home), *extra)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_unit_restarts_sandboxes_and_names_the_home_and_user(tmp_path: Path) -> None:
    home = tmp_path / "home"
    text = unit_text(home)
    lines = text.splitlines()
    for expected in (
        f"User={getpass.getuser()}",
        f"Environment=ALLERAC_HOME={home}",
        "Restart=on-failure",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={home}",
        "PrivateTmp=yes",
        "WantedBy=multi-user.target",
    ):
        assert expected in lines, expected
    (start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert start.endswith(f" up --home {home}")
    assert Path(start.removeprefix("ExecStart=").split()[0]).is_absolute()
    assert not home.exists()  # --print installs nothing
    user = unit_text(home, "--user").splitlines()
    assert not [line for line in user if line.startswith("User=")]
    assert "WantedBy=default.target" in user


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (scripts/setup.sh --test installs it)"
)
@pytest.mark.parametrize("scope", ["system", "user"])
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, scope: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    home = tmp_path / "home"
    home.mkdir()
    unit = tmp_path / "allerac.service"
    unit.write_text(unit_text(home, *(["--user"] if scope == "user" else [])), encoding="utf-8")
    runtime = tmp_path / "runtime"  # a user manager needs one, even to verify
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    verified = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *(["--user"] if scope == "user" else []), str(unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys or bad values: it must also say nothing.
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout + verified.stderr == ""


def test_paths_systemd_would_misread_are_refused(tmp_path: Path) -> None:
    for home in (tmp_path / "my home", tmp_path / "100%", tmp_path / 'a"b'):
        result = CliRunner().invoke(cli, ["service", "install", "--print", "--home", str(home)])
        assert result.exit_code == 1
        assert "cannot go into a systemd unit" in result.output
    bad = CliRunner().invoke(cli, ["service", "uninstall", "--name", "../etc/passwd"])
    assert bad.exit_code == 1
    assert "service name" in bad.output


def fake_systemctl(bin_dir: Path, log: Path, *, fails: bool = False) -> dict[str, str]:
    """A `systemctl` on PATH that records its arguments (and fails like one without a
    running systemd, when asked)."""
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    failure = (
        'echo "System has not been booted with systemd as init system (PID 1)." >&2; exit 1'
        if fails
        else "exit 0"
    )
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{failure}\n', encoding="utf-8")
    script.chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_install_and_uninstall(tmp_path: Path) -> None:
    units, home, log = tmp_path / "units", tmp_path / "home", tmp_path / "calls.log"
    env = {**fake_systemctl(tmp_path / "bin", log), "ALLERAC_SYSTEMD_UNIT_DIR": str(units)}
    installed = allerac("service", "install", "--home", str(home), env=env)
    assert installed.exit_code == 0, installed.output
    unit = units / "allerac.service"
    assert unit.read_text(encoding="utf-8") == unit_text(home)
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE(home.stat().st_mode) == 0o700  # ReadWritePaths= must exist
    assert log.read_text(encoding="utf-8").splitlines() == [
        "daemon-reload",
        "enable --now allerac.service",
    ]
    log.unlink()
    removed = allerac("service", "uninstall", env=env)
    assert removed.exit_code == 0, removed.output
    assert not unit.exists()
    assert home.is_dir()  # the data dir stays
    assert log.read_text(encoding="utf-8").splitlines() == [
        "disable --now allerac.service",
        "daemon-reload",
    ]
    again = allerac("service", "uninstall", env=env)
    assert again.exit_code == 1
    assert "no allerac.service installed" in again.output


def test_user_services_and_names(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {**fake_systemctl(tmp_path / "bin", log), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    home = tmp_path / "home"
    made = allerac("service", "install", "--user", "--name", "box2", "--home", str(home), env=env)
    assert made.exit_code == 0, made.output
    assert (tmp_path / "config" / "systemd" / "user" / "box2.service").is_file()
    assert log.read_text(encoding="utf-8").splitlines() == [
        "--user daemon-reload",
        "--user enable --now box2.service",
    ]
    assert allerac("service", "uninstall", "--user", "--name", "box2", env=env).exit_code == 0


def test_without_systemctl_or_systemd_it_says_so_and_installs_nothing(tmp_path: Path) -> None:
    units, home = tmp_path / "units", tmp_path / "home"
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {"PATH": str(empty), "ALLERAC_SYSTEMD_UNIT_DIR": str(units)}
    absent = allerac("service", "install", "--home", str(home), env=env)
    assert absent.exit_code == 1
    assert "systemctl was not found" in absent.output
    assert "--print" in absent.output
    assert not units.exists()
    units.mkdir()
    (units / "allerac.service").write_text("[Service]\n", encoding="utf-8")
    stuck = allerac("service", "uninstall", env=env)
    assert stuck.exit_code == 1
    assert "systemctl was not found" in stuck.output
    assert (units / "allerac.service").exists()  # not stopped, so not removed
    log = tmp_path / "calls.log"
    env = {
        **fake_systemctl(tmp_path / "bin", log, fails=True),
        "ALLERAC_SYSTEMD_UNIT_DIR": str(units),
    }
    failed = allerac("service", "install", "--home", str(home), env=env)
    assert failed.exit_code == 1
    assert "has not been booted with systemd" in failed.output
