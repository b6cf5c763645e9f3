"""Boxes on a LAN of their own: Linux network namespaces joined by a bridge, for tests.

`NetnsLab(n, root)` makes n namespaces `alr-<tag>-a`, `alr-<tag>-b`, ... (tag: 6 random
hex digits), a bridge `alrb<tag>` in the root namespace and one veth pair per namespace
(`veth0` inside, `alr<tag>h<i>` on the bridge). Every box gets an address of one /24 from
the benchmark range 198.18.0.0/15, multicast on, lo up and a route for 224.0.0.0/4, so mDNS
works between the boxes and nothing reaches the machine's real network.

A node runs inside its namespace with its HTTP API on that namespace's loopback, so the test
talks to it from inside too: `lab.cli(node, ...)` runs `python -m node ...` there and
`lab.http(node, ...)` makes a request on a thread that entered the namespace.

Leaving the lab (normally, on an exception or on Ctrl-C) kills the nodes it started and
deletes every namespace, veth and the bridge it made; `atexit` repeats that as a backstop.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from tests import launch
from tests.nodeproc import wait_for_run_info

STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 120.0
IP_TIMEOUT_S = 20.0

_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `check` until it holds; returns the seconds it took (AssertionError after timeout)."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)  # each check starts a process inside a namespace: not too often


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


_why_unavailable: str | None = None
_checked = False


def netns_unavailable() -> str | None:
    """None when namespaces can be made here, else why not (checked once, by trying)."""
    global _why_unavailable, _checked
    if _checked:
        return _why_unavailable
    _checked = True
    probe = f"alr-probe-{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        _why_unavailable = f"cannot run `ip netns add` ({exc})"
        return _why_unavailable
    if made.returncode != 0:
        _why_unavailable = (
            f"`ip netns add` failed (root and network-namespace support needed): "
            f"{made.stderr.strip()}"
        )
        return _why_unavailable
    _ip("netns", "del", probe, check=False)
    return None


def _http(
    url: str, method: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; called on a thread inside a box's namespace (`NetnsLab.http`)."""
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            code, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        code, head, raw = exc.code, exc.headers, exc.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode("utf-8", "replace")
    return code, {k.lower(): v for k, v in head.items()}, payload


class LabNode:
    """One `python -m node up` inside a namespace, its log in HOME/node.log."""

    def __init__(
        self,
        lab: NetnsLab,
        box: int,
        home: Path,
        args: list[str],
        config: str | None,
        http_host: str = "127.0.0.1",
    ) -> None:
        self.lab = lab
        self.box = box
        self.ns = lab.namespaces[box]
        self.ip = lab.ips[box]
        self.host_veth = lab.host_veths[box]
        self.home = home
        self.args = args
        self.config = config
        self.http_host = http_host
        self.proc: subprocess.Popen[bytes] | launch.Forked | None = None
        self.info: dict[str, Any] = {}
        self._log: Any = None

    @property
    def name(self) -> str:
        return self.home.name

    @property
    def node_id(self) -> str:
        return str(self.info["node_id"])

    @property
    def grpc_address(self) -> str:
        return str(self.info["grpc_address"])

    @property
    def url(self) -> str:
        return str(self.info["http_url"])

    def start(self) -> LabNode:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [
            *("ip", "netns", "exec", self.ns),  # execs in place: the pid is the node's own
            *(sys.executable, "-m", "node", "up", "--home", str(self.home)),
            *("--http-host", self.http_host, "--http-port", "0"),
            *("--grpc-host", self.ip, "--grpc-port", "0"),
            *self.args,
        ]
        if self.config is not None:
            path = self.home / "test-config.toml"
            path.write_text(self.config, encoding="utf-8")
            args += ["--config", str(path)]
        if launch.forking():
            self.proc = launch.start(args[7:], out=self.home / "node.log", env=_ENV, netns=self.ns)
        else:
            self._log = (self.home / "node.log").open("ab")
            self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=_ENV)
        try:
            self.info = wait_for_run_info(self.proc, self.home, self.output, f"node {self.name}")
        except RuntimeError:
            self.kill()
            raise
        return self

    def output(self) -> str:
        try:
            return (self.home / "node.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is not None and self._log is not None:
                self._log.close()

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()


def kill9(node: LabNode) -> None:
    """SIGKILL: the box vanishes without a word to its peers."""
    node.signal(signal.SIGKILL)
    node.wait(10)


def stop(node: LabNode) -> int | None:
    """SIGTERM: a graceful stop; returns the exit code (killed if it hangs)."""
    node.signal(signal.SIGTERM)
    try:
        return node.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        node.kill()
        raise


class NetnsLab:
    """n namespaces on one bridge; a context manager that leaves nothing behind."""

    def __init__(self, n: int, root: Path, *, subnet: str | None = None) -> None:
        if not 1 <= n <= 26:
            raise ValueError("between 1 and 26 boxes")
        self.root = root
        self.tag = secrets.token_hex(3)
        self.bridge = f"alrb{self.tag}"  # 10 chars (IFNAMSIZ allows 15)
        self.subnet = subnet or f"198.18.{secrets.randbelow(250) + 1}"
        letters = "abcdefghijklmnopqrstuvwxyz"[:n]
        self.namespaces = [f"alr-{self.tag}-{x}" for x in letters]
        self.host_veths = [f"alr{self.tag}h{i}" for i in range(n)]  # <= 12 chars
        self._inner_veths = [f"alr{self.tag}n{i}" for i in range(n)]  # renamed veth0 inside
        self.ips = [f"{self.subnet}.{10 + i}" for i in range(n)]
        self.nodes: list[LabNode] = []
        self._made_namespaces: list[str] = []
        self._made_links: list[str] = []
        self._closed = False
        self._old_sigterm: Any = None

    # --- building and tearing down ---------------------------------------------------------

    def __enter__(self) -> NetnsLab:
        atexit.register(self.close)
        self._catch_sigterm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        # No IGMP snooping: every multicast frame reaches every box, querier or not.
        _ip("link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
        _ip("link", "set", self.bridge, "multicast", "on", "up")
        boxes = zip(self.namespaces, self.host_veths, self._inner_veths, self.ips, strict=True)
        for ns, host, inner, ip in boxes:
            _ip("netns", "add", ns)
            self._made_namespaces.append(ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            self._made_links.append(host)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "multicast", "on", "up")
            _ip("-n", ns, "link", "set", inner, "name", "veth0")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "veth0")
            _ip("-n", ns, "link", "set", "veth0", "multicast", "on", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "veth0")

    def close(self) -> None:
        """Kill every node started here, delete every namespace and link made here."""
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
        for ns in self._made_namespaces:
            # Anything else still running in our namespace was started by this lab.
            with contextlib.suppress(Exception):
                pids = _ip("netns", "pids", ns, check=False).stdout.split()
                for pid in pids:
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns, check=False)
        for link in reversed(self._made_links):
            with contextlib.suppress(Exception):
                if _ip("link", "show", link, check=False).returncode == 0:
                    _ip("link", "del", link, check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._old_sigterm is not None:
            with contextlib.suppress(ValueError):  # not in the main thread
                signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _catch_sigterm(self) -> None:
        """A plain SIGTERM would end the test run without `finally` or atexit: turn it into
        SystemExit so the lab is still torn down."""

        def leave(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, leave)
                self._old_sigterm = signal.SIG_DFL

    # --- nodes -------------------------------------------------------------------------------

    def start(
        self,
        box: int,
        *args: str,
        config: str | None = None,
        http_host: str = "127.0.0.1",
        home_name: str | None = None,
    ) -> LabNode:
        """Start `python -m node up` in namespace `box` (0-based); args add to the flags.
        The HTTP API listens on the namespace's loopback unless `http_host` says otherwise;
        a second node in one namespace needs a `home_name` of its own."""
        home = self.root / (home_name or self.namespaces[box][-1])
        node = LabNode(self, box, home, list(args), config, http_host)
        self.nodes.append(node)
        return node.start()

    def run(
        self, box: int, *argv: str, timeout_s: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside namespace `box`."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespaces[box], *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=_ENV,
            check=False,
        )

    def python(
        self, box: int, script: str, *args: str, timeout_s: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return self.run(box, sys.executable, "-c", script, *args, timeout_s=timeout_s)

    def popen_python(self, box: int, script: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """A long-running script inside namespace `box`; killed with the lab."""
        return self.popen(box, sys.executable, "-c", script, *args, log=log)

    def cli(
        self, node: LabNode, *args: str, timeout_s: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """`python -m node ARGS --home HOME` inside the node's namespace."""
        if launch.forking():
            argv = [*args, "--home", str(node.home)]
            return launch.run(argv, timeout=timeout_s, env=_ENV, netns=self.namespaces[node.box])
        return self.run(
            node.box,
            *(sys.executable, "-m", "node", *args, "--home", str(node.home)),
            timeout_s=timeout_s,
        )

    def status(self, node: LabNode) -> dict[str, Any]:
        """What `allerac status --json` shows (the node's /allerac/status), asked over HTTP
        from this process: tests poll it often, and a CLI run each time would take CPU the
        nodes under test need."""
        code, _, body = self.http(node, "GET", "/allerac/status")
        if code != 200:
            raise RuntimeError(f"status of {node.name} failed: {code} {body}")
        return dict(body)

    def peer_states(self, node: LabNode) -> dict[str, str]:
        return {p["node_id"]: p["state"] for p in self.status(node)["peers"]}

    def up_peers(self, node: LabNode) -> set[str]:
        return {k for k, v in self.peer_states(node).items() if v == "up"}

    def invite(self, admin: LabNode, *args: str) -> str:
        result = self.cli(admin, "mesh", "invite", *args)
        if result.returncode != 0:
            raise RuntimeError(f"invite at {admin.name} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def join(self, node: LabNode, code: str) -> None:
        result = self.cli(node, "mesh", "join", code)
        if result.returncode != 0:
            raise RuntimeError(f"join at {node.name} failed: {result.stderr.strip()}")

    def http(
        self,
        node: LabNode,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request to the node's HTTP API, made on a thread inside its namespace."""
        request = functools.partial(_http, node.url + path, method, body, dict(headers or {}))
        return launch.in_namespace(self.namespaces[node.box], request)

    def attach_router(self, router: NetnsLab, box: int = 0) -> str:
        """Give namespace `box` of `router` a leg on this LAN (address .254) and make it
        every box's default route: the way to the internet. The router does not forward
        (a new namespace's default), so it reaches every LAN it has a leg on while those
        LANs do not reach each other: offices behind NAT, a relay in the cloud."""
        ns = router.namespaces[box]
        host = f"alr{self.tag}r{box}"
        inner = f"alr{self.tag}q{box}"
        _ip("link", "add", host, "type", "veth", "peer", "name", inner)
        router._made_links.append(host)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", host, "master", self.bridge)
        _ip("link", "set", host, "up")
        leg = f"{self.subnet}.254"
        _ip("-n", ns, "addr", "add", f"{leg}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        for office_ns in self.namespaces:
            _ip("-n", office_ns, "route", "add", "default", "via", leg)
        return leg

    def forwarding(self, box: int, on: bool) -> None:
        """Let namespace `box` route between its legs (on) or not (off)."""
        result = self.run(box, "sysctl", "-q", "-w", f"net.ipv4.ip_forward={int(on)}")
        if result.returncode != 0:
            raise RuntimeError(f"sysctl failed: {result.stderr.strip()}")

    def popen(self, box: int, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        """A long-running command inside namespace `box` (the lab kills it on close)."""
        out = log.open("ab")
        try:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[box], *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_ENV,
            )
        finally:
            out.close()

    def link_down(self, node: LabNode) -> None:
        """Unplug the box: its bridge-side veth goes down, packets to it vanish."""
        _ip("link", "set", node.host_veth, "down")

    def link_up(self, node: LabNode) -> None:
        """Plug it back in."""
        _ip("link", "set", node.host_veth, "up")


def start_all(lab: NetnsLab, plans: list[tuple[int, list[str], str]]) -> list[LabNode]:
    """Start several nodes at once (model loading dominates); plans: (box, args, config)."""
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = [pool.submit(lab.start, box, *args, config=cfg) for box, args, cfg in plans]
        return [f.result() for f in futures]


def sees_all_others_up(lab: NetnsLab, node: LabNode, everyone: set[str]) -> bool:
    return lab.up_peers(node) == everyone - {node.node_id}


def all_see_each_other_up(lab: NetnsLab, nodes: list[LabNode], timeout_s: float) -> float:
    everyone = {n.node_id for n in nodes}
    started = time.monotonic()
    for node in nodes:
        wait_until(
            functools.partial(sees_all_others_up, lab, node, everyone),
            max(0.0, timeout_s - (time.monotonic() - started)),
            f"{node.name} sees every other box up",
        )
    return time.monotonic() - started
