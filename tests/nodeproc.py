"""Run real `allerac` processes for tests, and always clean them up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import launch

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def wait_for_run_info(
    proc: subprocess.Popen[bytes],
    home: Path,
    output: Callable[[], str],
    name: str = "node",
    run_file_name: str = "node.json",
) -> dict[str, Any]:
    """Wait until the process started as `proc` publishes HOME/run/<file> (its pid in it)."""
    run_file = home / "run" / run_file_name
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{output()}")
        try:
            info = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            return dict(info)
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not become ready:\n{output()}")


class NodeProcess:
    def __init__(
        self,
        home: Path,
        *args: str,
        config: str | None = None,
        command: list[str] | None = None,
        forked: bool = True,
    ) -> None:
        self.home = home
        # Forked from the test worker's preloaded server (tests/launch.py) unless False, or
        # a command is given: then a new interpreter runs the command.
        self.forked = forked and command is None
        self.args = list(args)
        self.config = config
        # What runs the CLI: `python -m node`, or a launcher (the benchmarks' instant node).
        self.command = command or [sys.executable, "-m", "node"]
        self.proc: subprocess.Popen[bytes] | launch.Forked | None = None
        self.info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return str(self.info["http_url"])

    @property
    def node_id(self) -> str:
        return str(self.info["node_id"])

    @property
    def owner(self) -> dict[str, str]:
        """The header that makes a request the box owner's (what the CLI sends)."""
        return owner_headers(self.home)

    def start(self) -> NodeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [*self.command, "up", "--home", str(self.home)]
        # Loopback and no mDNS: tests never send multicast onto the machine's real network
        # (the mDNS tests run inside network namespaces).
        args += ["--http-port", "0", "--grpc-host", "127.0.0.1", "--grpc-port", "0"]
        args += ["--no-mdns", *self.args]
        if self.config is not None:
            path = self.home / "test-config.toml"
            path.write_text(self.config, encoding="utf-8")
            args += ["--config", str(path)]
        if self.forked and launch.forking():
            (self.home / "node.log").write_bytes(b"")
            self.proc = launch.start(args[3:], out=self.home / "node.log")
        else:
            self.log = (self.home / "node.log").open("wb")
            self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.info = wait_for_run_info(self.proc, self.home, self.output)
        except RuntimeError:
            self.kill()
            raise
        return self

    def output(self) -> str:
        try:
            return (self.home / "node.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Ask the node to stop; returns its exit code (kills it if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        if hasattr(self, "log"):
            self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "log"):
            self.log.close()


def owner_headers(home: Path) -> dict[str, str]:
    token = (home / "run" / "owner.token").read_text(encoding="ascii").strip()
    return {"Authorization": f"Bearer {token}"}


def run_cli(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if launch.forking():
        return launch.run([*args, "--home", str(home)], timeout=timeout, env=env)
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


class RelayProcess:
    """`python -m node relay up` (inside a namespace with `prefix`), restartable on the
    port it first bound."""

    def __init__(
        self, home: Path, *, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()
    ) -> None:
        self.home = home
        self.host = host
        self.prefix = prefix
        self.port = 0
        self.proc: subprocess.Popen[bytes] | launch.Forked | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        try:
            return (self.home / "relay.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def start(self) -> RelayProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = ["relay", "up", "--home", str(self.home)]
        argv += ["--host", self.host, "--port", str(self.port), "--log-level", "info"]
        if not self.prefix and launch.forking():
            self.proc = launch.start(argv, out=self.home / "relay.log")
        else:
            with (self.home / "relay.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    # `ip netns exec NS` execs in place: the pid is the relay's
                    [*self.prefix, sys.executable, "-m", "node", *argv],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        try:
            info = wait_for_run_info(self.proc, self.home, self.output, "relay", "relay.json")
        except RuntimeError:
            self.kill()
            raise
        self.port = int(info["port"])
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
