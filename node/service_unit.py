"""The systemd unit that runs a node as a service (`allerac service install`).

The unit starts `allerac up --home HOME` as the user who installed it, restarts it when it
fails (not when it was stopped), stops it with SIGTERM to the node alone (`KillMode=mixed`:
the node finishes the answers in flight, then its worker processes go with it) and gives it
time to. It is sandboxed the way systemd recommends for a network daemon that writes only
its own data dir: no new privileges, the whole file system read-only but the data dir
(`ProtectSystem=strict` + `ReadWritePaths`), a private /tmp, no kernel tunables, modules or
cgroups, a umask that keeps new files private. Devices stay visible (GPUs serve models).

A system unit (`/etc/systemd/system`) names its user; a user unit (`--user`,
`~/.config/systemd/user`) runs in the user's own manager. Values go into the unit as they
are, so a path systemd would read differently (whitespace, quotes, backslashes, `%`
specifiers, control characters) is refused rather than escaped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ConfigError

UNIT_NAME = "allerac"
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./@:+=,-]+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
STOP_TIMEOUT_S = 45  # above the node's default shutdown grace (10 s), with room to spare
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    # the API and the mesh (IPv4, IPv6), local sockets, and netlink to list interfaces (mDNS)
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "UMask=0077",
)


@dataclass(frozen=True, kw_only=True)
class ServiceUnit:
    """What a unit says: how to start the node, on which data dir, as whom."""

    command: tuple[str, ...]  # the `allerac` program (or python -m node), absolute
    home: Path
    user: str | None  # None: a user unit, run by the user's own manager
    name: str = UNIT_NAME

    @property
    def file_name(self) -> str:
        return unit_file_name(self.name)

    def text(self) -> str:
        for value in (*self.command, str(self.home), self.user or ""):
            if value and not _SAFE_VALUE.match(value):
                raise ConfigError(
                    f"{value!r} cannot go into a systemd unit as it is (whitespace, quotes, "
                    "backslashes and % mean something there): use a path without them"
                )
        home = str(self.home)
        lines = [
            f"# {self.file_name}: written by `allerac service install`; removed by "
            "`allerac service uninstall`.",
            "[Unit]",
            f"Description=Allerac Mesh node (data dir {home})",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=exec",
            *([f"User={self.user}"] if self.user else []),
            f"Environment=ALLERAC_HOME={home}",
            "Environment=PYTHONUNBUFFERED=1",
            f"ExecStart={' '.join(self.command)} up --home {home}",
            "Restart=on-failure",
            "RestartSec=5s",
            "KillMode=mixed",
            f"TimeoutStopSec={STOP_TIMEOUT_S}s",
            *HARDENING,
            f"ReadWritePaths={home}",
            "",
            "[Install]",
            f"WantedBy={'multi-user.target' if self.user else 'default.target'}",
        ]
        return "\n".join(lines) + "\n"


def unit_file_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"service name {name!r}: use letters, digits, _ . @ - (64 at most)")
    return f"{name}.service"


def unit_dir(*, user: bool, environ: dict[str, str] | None = None) -> Path:
    """Where units go: `$ALLERAC_SYSTEMD_UNIT_DIR` when set (tests, packagers), else the
    administrator's system dir, or the user's (`$XDG_CONFIG_HOME/systemd/user`)."""
    env = os.environ if environ is None else environ
    override = env.get("ALLERAC_SYSTEMD_UNIT_DIR")
    if override:
        return Path(override)
    if not user:
        return Path("/etc/systemd/system")
    config = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"
