"""The `allerac` command line. Parsing happens in `main()`, never at import time."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import signal
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click

from mesh.config import Flags
from mesh.errors import MeshError
from node.cli_backup import backup
from node.cli_client import NodeAddress, NodeRefused, node_at, node_json, node_request
from node.cli_options import chat_body, home_option
from node.cli_service import service
from node.signals import SighupReloads
from node.store.config_file import ConfigSource, build_config
from node.store.home import Home

DEFAULT_CHAT_SYSTEM = None


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allerac-mesh", prog_name="allerac")
def cli() -> None:
    """Allerac Mesh: your boxes and cloud GPUs as one private, OpenAI-compatible AI service."""


# --- up -------------------------------------------------------------------------------------


@cli.command()
@home_option
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (default: HOME/config.toml if present).",
)
@click.option(
    "--http-host",
    help="Address of the OpenAI-compatible API; beyond loopback, clients need an API key.",
)
@click.option("--http-port", type=int, help="Port of the HTTP API; 0 picks a free one.")
@click.option("--grpc-host", help="Address mesh peers reach the gRPC agent on (default all).")
@click.option("--grpc-port", type=int, help="Port of the gRPC agent; 0 picks a free one.")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="PATH_OR_NAME",
    help="Serve this model (a GGUF file or a configured name); repeatable.",
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    metavar="HOST:PORT",
    help="A box of the mesh to connect to directly (no multicast needed); repeatable.",
)
@click.option(
    "--relay",
    "relays",
    multiple=True,
    metavar="HOST:PORT",
    help="A relay through which members elsewhere and cloud nodes are reached; repeatable.",
)
@click.option("--no-mdns", is_flag=True, help="Do not announce or look for boxes with mDNS.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="Log lines (the HTTP request log included) as text or as JSON objects.",
)
def up(
    home_dir: Path | None,
    config_file: Path | None,
    http_host: str | None,
    http_port: int | None,
    grpc_host: str | None,
    grpc_port: int | None,
    models: tuple[str, ...],
    peers: tuple[str, ...],
    relays: tuple[str, ...],
    no_mdns: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Start this node and serve until Ctrl-C or SIGTERM."""
    from node.api.request_log import configure_logging
    from node.daemon import Node  # heavy imports only for the command that needs them

    configure_logging(log_level, log_format)
    home = Home.resolve(home_dir)
    if config_file is None and home.config_file.is_file():
        config_file = home.config_file
    flags = Flags(
        http_host=http_host,
        http_port=http_port,
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        models=models,
        peers=peers,
        relays=relays,
        no_mdns=no_mdns,
    )
    # SIGHUP reads the same file again, with the same flags on top.
    source = ConfigSource(file=config_file, default_file=home.config_file, flags=flags)
    try:
        config = build_config(config_file=config_file, flags=flags)
    except MeshError as exc:
        _fail(exc.message)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads = SighupReloads(loop)  # from now on SIGHUP reloads, never stops the node
        async with Node(config, home, source=source) as node:
            first = node.models.models()[0].name if node.models else "MODEL"
            new = " (new identity)" if node.created_identity else ""
            click.echo(f"Allerac node {node.node_id}{new}")
            click.echo(f"  data dir   {home.root}")
            click.echo(
                f"  models     {', '.join(m.name for m in node.models.models())}"
                if node.models
                else ""
            )
            click.echo(f"  API        {node.http_url}/v1   (OpenAI-compatible)")
            click.echo(f"  gRPC       {node.grpc_address}")
            click.echo("Try it:")
            click.echo(
                f"  allerac chat{' --home ' + str(home.root) if home_dir else ''} "
                '"What is the capital of France?"'
            )
            click.echo(
                f"  curl -s {node.http_url}/v1/chat/completions -H 'Content-Type: "
                f'application/json\' -d \'{{"model": "{first}", "messages": '
                '[{"role": "user", "content": "Hello!"}]}\''
            )
            click.echo("Ready. Ctrl-C stops the node.", nl=True)
            sys.stdout.flush()
            await reloads.serve_until(stop, node.reconfigurer)
            click.echo("Stopping: finishing answers in progress...", err=True)

    try:
        asyncio.run(serve())
    except MeshError as exc:
        _fail(exc.message)


# --- clients of a running node ----------------------------------------------------------------


@cli.group()
def mesh() -> None:
    """Your mesh: invite boxes, join one, list members, revoke."""


@mesh.command()
@home_option
@click.option(
    "--role",
    type=click.Choice(["member", "overflow"]),
    default="member",
    show_default=True,
    help="overflow: a cloud node that serves but never routes.",
)
@click.option(
    "--ttl", default="1h", show_default=True, help="How long the code works: 15m, 2h, 7d."
)
def invite(home_dir: Path | None, role: str, ttl: str) -> None:
    """Print a one-time invite code for another box."""
    from node.api.mesh_admin import parse_duration

    try:
        ttl_s = parse_duration(ttl)
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    body = {"role": role, "ttl_s": ttl_s}
    reply = node_json(node_at(home_dir), "POST", "/allerac/mesh/invites", body)
    click.echo(reply["code"])
    click.echo(
        f"One-time {reply['role']} invite to mesh {reply['mesh_id']}, valid {ttl}. "
        "On the other box run:  allerac mesh join CODE",
        err=True,
    )


@mesh.command()
@home_option
@click.argument("code")
@click.option(
    "--leave-current",
    is_flag=True,
    help="Leave the mesh this box is in now, with its other members (asked when not given).",
)
def join(home_dir: Path | None, code: str, leave_current: bool) -> None:
    """Join the mesh that CODE invites this box to (the node must be running)."""
    node = node_at(home_dir)
    body: dict[str, Any] = {"code": code, "leave_current": leave_current}
    try:
        reply = node_json(node, "POST", "/allerac/mesh/join", body)
    except NodeRefused as refused:
        if refused.code != "mesh_not_empty" or not sys.stdin.isatty():
            raise
        click.echo(refused.reason, err=True)
        click.confirm("Leave the current mesh and join the new one?", abort=True)
        reply = node_json(node, "POST", "/allerac/mesh/join", {**body, "leave_current": True})
    click.echo(f"Joined mesh {reply['mesh_id']} as {reply['role']}.")


@mesh.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def members(home_dir: Path | None, as_json: bool) -> None:
    """List the members this node knows (an admin knows everyone it invited)."""
    data = node_json(node_at(home_dir), "GET", "/allerac/mesh/members")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"mesh {data['mesh_id']}  (revocation list v{data['revocations_version']})")
    for member in data["members"]:
        flags = " (this node)" if member["this_node"] else ""
        flags += " REVOKED" if member["revoked"] else ""
        click.echo(f"  {member['node_id']}  {member['role']:8} {member['display_name']}{flags}")


@mesh.command()
@home_option
@click.argument("node_id")
def revoke(home_dir: Path | None, node_id: str) -> None:
    """Revoke NODE_ID: every peer refuses it from now on."""
    reply = node_json(node_at(home_dir), "POST", "/allerac/mesh/revoke", {"node_id": node_id})
    click.echo(
        f"Revocation list v{reply['version']}: {len(reply['revoked'])} revoked; told "
        f"{len(reply['told'])} member(s) at once."
    )
    for node, error in reply["unreachable"].items():
        click.echo(f"  not reached yet: {node} ({error})", err=True)


@mesh.group("admin")
def mesh_admin() -> None:
    """More admins, so the mesh outlives its first admin box."""


@mesh_admin.command("add")
@home_option
@click.argument("node_id")
def mesh_admin_add(home_dir: Path | None, node_id: str) -> None:
    """Make member NODE_ID an admin too: it can then invite and revoke (run on an admin;
    NODE_ID must be running and reachable)."""
    reply = node_json(node_at(home_dir), "POST", "/allerac/mesh/admins", {"node_id": node_id})
    click.echo(f"Node {reply['node_id']} is now an admin of mesh {reply['mesh_id']}.")


@cli.group()
def user() -> None:
    """Users of the mesh, their API keys (needed beyond loopback) and quotas."""


PRIVACY_CHOICE = click.Choice(["local-only", "mesh", "any"])
QUOTA_HELP = (
    "Tokens per period and tier class, e.g. mesh=unlimited,cloud=1M/month or "
    "mesh=200k/day (classes: mesh, cloud; periods: day, month, UTC). "
    "Kept by this node, the user's home."
)


PLAN_HELP = (
    "A plan instead of --quota: starter (1M tokens a month on cloud hardware, models up to "
    "8B parameters), personal (10M, up to 14B) or pro (50M, every model); a box's config may "
    "change them or add others with [plans.NAME]."
)


def _check_quota(spec: str | None) -> None:
    from mesh.quota.rules import parse_quota

    if spec is not None:
        try:
            parse_quota(spec)
        except MeshError as exc:
            raise click.ClickException(exc.message) from exc


@user.command("add")
@home_option
@click.argument("name")
@click.option(
    "--privacy",
    type=PRIVACY_CHOICE,
    default=None,
    help="The key's privacy policy: its requests' default and the loosest they may ask "
    "for (default: the node's scheduler.privacy).",
)
@click.option("--quota", default=None, help=QUOTA_HELP + " Default: unlimited.")
@click.option("--plan", default=None, help=PLAN_HELP)
def user_add(
    home_dir: Path | None, name: str, privacy: str | None, quota: str | None, plan: str | None
) -> None:
    """Add user NAME and print their API key (shown this once only). The key works on
    every box of the mesh a moment later."""
    _check_quota(quota)
    body = {
        "name": name,
        **({"privacy": privacy} if privacy else {}),
        **({"quota": quota} if quota is not None else {}),
        **({"plan": plan} if plan is not None else {}),
    }
    reply = node_json(node_at(home_dir), "POST", "/allerac/users", body)
    click.echo(reply["api_key"])
    click.echo(
        f"API key of {reply['name']} (privacy {reply['privacy']}, quota {reply['quota']}). "
        "It is shown only now and not stored (the node keeps its hash): hand it over, it "
        "cannot be shown again. Clients send it as: Authorization: Bearer KEY",
        err=True,
    )


@user.command("set")
@home_option
@click.argument("name")
@click.option("--privacy", type=PRIVACY_CHOICE, default=None, help="A new privacy policy.")
@click.option("--quota", default=None, help=QUOTA_HELP)
@click.option("--plan", default=None, help=PLAN_HELP)
def user_set(
    home_dir: Path | None, name: str, privacy: str | None, quota: str | None, plan: str | None
) -> None:
    """Change user NAME's privacy policy, quota or plan (their key stays the same)."""
    _check_quota(quota)
    if privacy is None and quota is None and plan is None:
        raise click.ClickException("give --privacy, --quota or --plan")
    body = {
        **({"privacy": privacy} if privacy else {}),
        **({"quota": quota} if quota is not None else {}),
        **({"plan": plan} if plan is not None else {}),
    }
    path = "/allerac/users/" + urllib.parse.quote(name, safe="")
    reply = node_json(node_at(home_dir), "PATCH", path, body)
    click.echo(f"User {reply['name']}: privacy {reply['privacy']}, quota {reply['quota']}.")


@user.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def user_list(home_dir: Path | None, as_json: bool) -> None:
    """List the users (never their keys)."""
    data = node_json(node_at(home_dir), "GET", "/allerac/users")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data["users"]:
        click.echo("no users yet; add one with: allerac user add NAME")
        return
    click.echo(f"{'NAME':24} {'PRIVACY':10} {'CREATED (UTC)':17} QUOTA")
    for entry in data["users"]:
        created = datetime.datetime.fromtimestamp(entry["created_at_ms"] / 1000, datetime.UTC)
        click.echo(
            f"{entry['name']:24} {entry['privacy']:10} {created:%Y-%m-%d %H:%M}  {entry['quota']}"
        )
        for state in entry.get("quota_state", []):
            click.echo(
                f"{'':24}   {state['limit']}: {state['used']:,} used, {state['reserved']:,} "
                f"reserved, {state['left']:,} left until {state['resets_at']}"
            )


@user.command("remove")
@home_option
@click.argument("name")
def user_remove(home_dir: Path | None, name: str) -> None:
    """Remove user NAME: their API key stops working at once."""
    from mesh.quota.users import validate_name

    try:
        validate_name(name)
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    path = "/allerac/users/" + urllib.parse.quote(name, safe="")
    reply = node_json(node_at(home_dir), "DELETE", path)
    click.echo(f"Removed user {reply['name']}: their API key no longer works.")


@cli.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(home_dir: Path | None, as_json: bool) -> None:
    """Show this node: identity, addresses, load and models."""
    info = node_json(node_at(home_dir), "GET", "/allerac/status")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    load = info["load"]
    click.echo(f"node      {info['node_id']}  ({info['display_name']})")
    click.echo(
        f"version   {info['version']} (protocol v{info['protocol_version']}), "
        f"pid {info['pid']}, up {info['uptime_s']} s"
    )
    profile = info.get("profile")
    if profile:
        click.echo(
            f"profile   {profile['name']} ({profile['chosen_by']}): "
            f"{profile['threads'] or 'default'} threads, "
            f"context {profile['context_length']}, "
            f"{profile['model_memory_bytes'] / (1 << 30):.1f} GiB for models"
        )
    click.echo(f"API       {info['http_url']}/v1")
    click.echo(f"gRPC      {info['grpc_address']}")
    click.echo(
        f"load      {load['active_streams']} of {load['parallel']} slots in use, "
        f"{load['queued']} waiting (at most {load['slots'] - load['parallel']})"
        f"{' (draining)' if load['draining'] else ''}"
    )
    for model in info["models"]:
        tps = f"{model['tokens_per_second']:.0f} tok/s" if model["tokens_per_second"] else "-"
        where = (
            f"  {model['parallel']} slots, {model['threads']} threads" if model["threads"] else ""
        )
        held = model.get("conversations_held")
        click.echo(
            f"model     {model['name']}  ctx {model['context_length']}  "
            f"{model['quantization'] or '?'}  {tps}{where}"
            + (f", {held} conversations held" if held else "")
        )
    routed = info.get("cache_routed") or {}
    if routed.get("asked"):
        click.echo(
            f"cache     {routed['asked']} requests sent here for a conversation it held, "
            f"{routed['held']} still held"
        )
    click.echo(f"mesh      {info['mesh_id']}  (this node: {info['role']})")
    if not info["peers"]:
        click.echo("peers     none yet (other boxes appear here when they join the mesh)")
    for peer in info["peers"]:
        load = peer["load"]
        click.echo(
            f"peer      {peer['node_id'][:15]}  {peer['state']:7} {peer['route']:5} "
            f"rtt {peer['rtt_ms']:.1f} ms  load {load['active_streams']}+{load['queued']}"
            f"/{load['slots']}  {peer['display_name']}  models: {', '.join(peer['models'])}"
        )


def _stream_chat(node: NodeAddress, body: dict[str, Any]) -> str:
    """Send one chat request, print the answer as it streams, return its text."""
    parts: list[str] = []
    with node_request(node, "POST", "/v1/chat/completions", body) as response:
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise click.ClickException(chunk["error"].get("message", "the answer failed"))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    parts.append(text)
                    click.echo(text, nl=False)
                    sys.stdout.flush()
    click.echo()
    return "".join(parts)


@cli.command()
@home_option
@click.option("-m", "--model", default="default", show_default=True, help="Model name or alias.")
@click.option("--system", default=None, help="System message (default: the model's own).")
@click.option("--max-tokens", type=int, default=None, help="Answer length limit in tokens.")
@click.option("--temperature", type=float, default=None, help="0 for greedy answers.")
@click.argument("prompt", required=False)
def chat(
    home_dir: Path | None,
    model: str,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    prompt: str | None,
) -> None:
    """Chat with the node: one answer for PROMPT, or an interactive session without it."""
    node = node_at(home_dir)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def ask(text: str) -> str:
        body: dict[str, Any] = {
            "model": model,
            "messages": [*history, {"role": "user", "content": text}],
            "stream": True,
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        return _stream_chat(node, body)

    if prompt is not None:
        ask(prompt)
        return
    if not sys.stdin.isatty():  # `echo QUESTION | allerac chat`: stdout is the answer alone
        text = sys.stdin.read()
        if not text.strip():
            _fail("nothing to ask: give a PROMPT or pipe a question in")
        ask(text.strip())
        return
    _chat_session(Home.resolve(home_dir), node, model, ask, history)


def _chat_session(
    home: Home,
    node: NodeAddress,
    model: str,
    ask: Callable[[str], str],
    history: list[dict[str, str]],
) -> None:
    """The interactive chat at a terminal: readline editing and history, multi-line input."""
    from node.chat_input import line_editing, read_message

    click.echo(
        f"Chatting with {model} at {node.url} (Ctrl-D or /exit to leave, Ctrl-C stops an "
        'answer; end a line with \\ to go on, or put a long text between """ lines).'
    )
    with line_editing(home.root / "chat_history"):
        while True:
            try:
                text = read_message(input)
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            if text.strip() in ("/exit", "/quit"):
                return
            if not text.strip():
                continue
            try:
                answer = ask(text)
            except KeyboardInterrupt:
                click.echo("\n(answer stopped)")
                continue
            except click.ClickException as refused:  # said, and the session goes on
                click.echo(f"Error: {refused.format_message()}", err=True)
                continue
            history.extend(
                ({"role": "user", "content": text}, {"role": "assistant", "content": answer})
            )


@cli.command()
@home_option
@click.argument("model")
@click.option("--explain", is_flag=True, help="Show every candidate and its score.")
@click.option(
    "--privacy", type=click.Choice(["local-only", "mesh", "any"]), default="mesh", show_default=True
)
@click.option("--max-tokens", type=int, default=None)
@click.option(
    "--needs",
    default="",
    help="Capabilities the request asks, comma-separated (tools, structured_output, logprobs, "
    "penalties, logit_bias, echo, choices, embeddings).",
)
@click.option(
    "--messages",
    "messages_file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Plan this chat: a JSON file ('-': stdin) holding its messages (an array of "
    "OpenAI messages, or a whole chat completions body); shows the boxes holding the start "
    "of the conversation (cache-aware routing).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def route(
    home_dir: Path | None,
    model: str,
    explain: bool,
    privacy: str,
    max_tokens: int | None,
    needs: str,
    messages_file: TextIO | None,
    as_json: bool,
) -> None:
    """Where a request for MODEL would go now, and (--explain) why."""
    if messages_file is not None:
        body = chat_body(messages_file, model=model, max_tokens=max_tokens)
        query = urllib.parse.urlencode({"privacy": privacy})
        data = node_json(node_at(home_dir), "POST", f"/allerac/route?{query}", body)
    else:
        query = urllib.parse.urlencode(
            {
                "model": model,
                "privacy": privacy,
                **({"max_tokens": max_tokens} if max_tokens else {}),
                **({"needs": needs} if needs else {}),
            }
        )
        data = node_json(node_at(home_dir), "GET", f"/allerac/route?{query}")
    rows = data["candidates"]
    chosen = next((r for r in rows if r["status"] == "chosen"), None)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif chosen is None:
        click.echo(f"{model}: nobody can serve it now ({data['reason']})")
    else:
        click.echo(f"{model} -> {chosen['node_id']} ({chosen['route']}): {data['reason']}")
    if explain and not as_json:
        click.echo(
            f"{'NODE':16} {'ROUTE':6} {'ETA ms':>8} {'WAIT ms':>8} {'RTT ms':>7} "
            f"{'LOAD':>6} {'TOK/S':>6} {'CACHED':>6}  STATUS"
        )
        for r in rows:
            eta = f"{r['eta_ms']:.0f}" if r["eta_ms"] is not None else "-"
            wait = f"{r['wait_ms']:.0f}" if r["wait_ms"] is not None else "-"
            click.echo(
                f"{r['node_id'][:15]:16} {r['route']:6} {eta:>8} {wait:>8} "
                f"{r['rtt_ms']:>7.1f} {r['busy']:>3}/{r['slots']:<2} "
                f"{r['tokens_per_second']:>6.0f} {r.get('cached_tokens', 0):>6}  {r['status']}"
            )
        if data.get("by_cache"):
            click.echo("The cache decided: without it another box would serve this request.")
    if chosen is None:
        sys.exit(1)  # the question was "who serves it": nobody does


@cli.command()
@home_option
@click.option("--print", "print_only", is_flag=True, help="Only print the URL; open no browser.")
def console(home_dir: Path | None, print_only: bool) -> None:
    """Open the console in a browser: a one-time login URL for the box's owner (valid two
    minutes, good for one sign-in)."""
    reply = node_json(node_at(home_dir), "POST", "/console/login-tokens", {})
    url = str(reply["url"])
    click.echo(url)
    if not print_only:
        import webbrowser

        if not webbrowser.open(url):
            click.echo("No browser found here: open the URL above in one.", err=True)


# --- ledger ------------------------------------------------------------------------------------


@cli.group()
def ledger() -> None:
    """The signed usage ledger this node holds."""


def _verified_ledger(home: Home, *, require_receipts: bool) -> tuple[Any, Any]:
    """Everything in this home's ledger, and its verification (in a few processes)."""
    import os

    from node.store.usage_report import existing_ledger, verified_ledger
    from node.store.workers import chunk_map

    return verified_ledger(
        existing_ledger(home.root, home.ledger_file),
        require_receipts=require_receipts,
        map_chunks=chunk_map(min(os.cpu_count() or 1, 4)),
    )


@ledger.command("verify")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ledger_verify(home_dir: Path | None, as_json: bool) -> None:
    """Check every record's signature, each node's chain and the countersignatures; report
    forks, gaps, truncated chains and refused records by node and sequence. Exits 1 when
    anything is wrong."""
    from node.store.usage_report import verification

    home = Home.resolve(home_dir)
    try:
        held, report = _verified_ledger(home, require_receipts=True)
    except MeshError as exc:
        _fail(exc.message)
        return
    result = verification(held, report)
    problems, awaited = result["problems"], result["awaiting_receipts"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{report.records} records from {report.nodes} nodes")
        for chain in result["chains"]:
            signers = ", ".join(str(n)[:7] for n in chain["countersigned_by"]) or "nobody yet"
            signed = (
                f"signed head #{chain['signed_seq']}, countersigned by {signers}"
                if chain["signed_seq"]
                else "no signed head held"
            )
            click.echo(f"  {str(chain['node_id'])[:7]} up to #{chain['seq']}; {signed}")
        for p in problems:
            click.echo(f"  {p['kind']:14} {p['node_id'][:7]} #{p['seq']}: {p['detail']}")
        if awaited:
            click.echo(
                f"{awaited} records served for other entry nodes: their countersignatures "
                "are kept there (ledger sync brings them here)"
            )
        click.echo("ledger verifies" if not problems else f"{len(problems)} problems")
    if problems:
        sys.exit(1)


@cli.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--user", default=None, help="Only this user's requests ('' for the owner).")
@click.option(
    "--period", default="all", show_default=True, help="all, day, month, 2026-11 or 2026-11-25"
)
@click.option(
    "--by",
    type=click.Choice(["node", "model", "tier", "user", "day"]),
    default="user",
    show_default=True,
)
@click.option(
    "--cost",
    is_flag=True,
    help="Price the usage per route with [prices] from the config (per 1,000 tokens).",
)
def usage(
    home_dir: Path | None, as_json: bool, user: str | None, period: str, by: str, cost: bool
) -> None:
    """Who used what, where, from the signed records this node holds (UTC periods).
    Records their entry node refused to countersign are not counted (they are listed);
    when records are known to be missing from this ledger it says which, and exits 1.
    Boxes are shown by their display names (those the node has seen).
    With --cost: per route, priced from the config's [prices]."""
    from mesh.clock import SYSTEM
    from mesh.ledger.records import period_bounds
    from node.store.names_file import names_path, read_names
    from node.store.usage_report import usage as usage_report

    home = Home.resolve(home_dir)
    try:
        since, until = period_bounds(period, now_ms=SYSTEM.now_ms())  # before the ledger is read
        held, report = _verified_ledger(home, require_receipts=False)
        if cost:
            from mesh.ledger.records import refused_records, summarize
            from node.cli_costs import print_costs

            refused = refused_records(held.records, held.refusals)
            rows = summarize(
                held.records, by="tier", user=user, since_ms=since, until_ms=until, excluded=refused
            )
            print_costs(home, rows, as_json=as_json)
            return
        result = usage_report(
            held,
            report,
            by=by,
            user=user,
            period=period,
            now_ms=SYSTEM.now_ms(),
            names=read_names(names_path(home.root)),
        )
    except MeshError as exc:
        _fail(exc.message)
        return
    missing = result["missing"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{by:58} {'requests':>9} {'prompt':>10} {'completion':>11}")
        for r in result["rows"]:
            key = f"{r['display_name']} ({r[by][:7]})" if by == "node" else r[by]
            click.echo(
                f"{key:58} {r['requests']:9} {r['prompt_tokens']:10} {r['completion_tokens']:11}"
            )
        if not result["rows"]:
            click.echo("no usage recorded in this period")
        for item in result["refused"]:
            click.echo(
                f"not counted: {str(item['node_id'])[:7]} #{item['seq']} claims "
                f"{item['prompt_tokens']} prompt and {item['completion_tokens']} completion "
                "tokens its entry node refused to countersign (see allerac ledger verify)"
            )
    if missing:
        ranges = ", ".join(
            f"{str(m['node_id'])[:7]} #{m['from_seq']}"
            + (f" to #{m['to_seq']}" if m["to_seq"] != m["from_seq"] else "")
            for m in missing
        )
        click.echo(
            f"records missing from this ledger: {ranges}; these figures lack them "
            "(see allerac ledger verify)",
            err=True,
        )
        sys.exit(1)


# --- relay ------------------------------------------------------------------------------------


@cli.group()
def relay() -> None:
    """Run a blind relay, or look at one."""


@relay.command("up")
@home_option
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")  # noqa: S104
@click.option("--port", type=int, default=7443, show_default=True, help="0 picks a free one.")
@click.option(
    "--mesh",
    "meshes",
    multiple=True,
    metavar="MESH_ID",
    help="Serve only these meshes (repeatable); default: any mesh.",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
def relay_up(
    home_dir: Path | None, host: str, port: int, meshes: tuple[str, ...], log_level: str
) -> None:
    """Forward sealed traffic between nodes of the same mesh (it cannot read it)."""
    from cloud_relay.server import Relay  # heavy imports only for the command that needs them

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    home = Home.resolve(home_dir)
    home.ensure()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Relay(
            host=host,
            port=port,
            run_file=home.run_dir / "relay.json",
            allowed_meshes=frozenset(meshes) or None,
        ) as server:
            click.echo(f"Allerac relay listening on {server.address}")
            if meshes:
                click.echo(f"  serving only mesh(es) {', '.join(meshes)}")
            click.echo(f"  operator token (for relay stats) in {home.run_dir / 'relay.token'}")
            click.echo(
                f"  nodes join it with: allerac up --relay HOST:{server.address.rsplit(':', 1)[1]}"
            )
            click.echo("Ready. Ctrl-C stops the relay.")
            sys.stdout.flush()
            await stop.wait()

    try:
        asyncio.run(serve())
    except MeshError as exc:
        _fail(exc.message)


@relay.command("stats")
@home_option
@click.argument("address", metavar="HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def relay_stats(home_dir: Path | None, address: str, as_json: bool) -> None:
    """What a relay forwarded and refused (totals only); for its operator, with the token
    `relay up` wrote in its data dir."""
    from cloud_relay.client import fetch_stats
    from cloud_relay.operator_token import read_operator_token

    try:
        token = read_operator_token(Home.resolve(home_dir).run_dir)
        stats = asyncio.run(fetch_stats(address, token=token))
    except MeshError as exc:
        _fail(exc.message)
        return
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    for key, value in stats.items():
        click.echo(f"{key:18} {value}")


def _register_commands() -> None:
    """Command groups that live in their own modules."""
    from node.cli_models import models

    cli.add_command(backup)
    cli.add_command(service)
    cli.add_command(models)


_register_commands()


def main() -> None:
    cli(prog_name="allerac")


if __name__ == "__main__":
    main()
