"""`allerac models`: list the models (no subcommand, as before), and add, remove or pull
one while the node runs. The node does the work (`/allerac/models`, owner token only);
`pull` downloads here first (`node.transport.model_download`), then adds the file."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click

from mesh.errors import MeshError
from node.cli_client import node_at, node_json
from node.cli_options import home_option
from node.store.home import Home


@click.group("models", invoke_without_command=True)
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models(ctx: click.Context, home_dir: Path | None, as_json: bool) -> None:
    """List the models this node can serve; add, remove or pull one without a restart."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = home_dir  # `allerac models --home DIR add ...` means that home too
        return
    data = node_json(node_at(home_dir), "GET", "/v1/models")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{'MODEL':32} {'ALIASES':20} {'CONTEXT':>8} {'QUANT':8} FAMILY")
    for model in data["data"]:
        click.echo(
            f"{model['id']:32} {','.join(model.get('aliases', [])) or '-':20} "
            f"{model.get('context_length', 0):>8} {model.get('quantization') or '-':8} "
            f"{model.get('family') or '-'}"
        )


def _report(reply: dict[str, Any]) -> None:
    for line in reply["changes"]:
        click.echo(f"  {line}", err=True)
    click.echo(f"Now serving: {', '.join(reply['models'])}", err=True)


def _add(home_dir: Path | None, path: Path, name: str | None, aliases: tuple[str, ...]) -> None:
    body: dict[str, Any] = {"path": str(path), "aliases": list(aliases)}
    if name is not None:
        body["name"] = name
    reply = node_json(node_at(home_dir), "POST", "/allerac/models", body)
    click.echo(reply["name"])
    _report(reply)


@models.command("add")
@home_option
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="What the mesh calls it (default: from the file).")
@click.option("--alias", "aliases", multiple=True, help="Another name for it; repeatable.")
@click.pass_obj
def models_add(
    group_home: Path | None,
    home_dir: Path | None,
    path: Path,
    name: str | None,
    aliases: tuple[str, ...],
) -> None:
    """Serve the GGUF file PATH now (and from now on: the config file records it)."""
    _add(home_dir or group_home, path.expanduser().absolute(), name, aliases)


@models.command("remove")
@home_option
@click.argument("name")
@click.pass_obj
def models_remove(group_home: Path | None, home_dir: Path | None, name: str) -> None:
    """Stop serving model NAME; answers in progress on it finish first."""
    path = "/allerac/models/" + urllib.parse.quote(name, safe="")
    reply = node_json(node_at(home_dir or group_home), "DELETE", path)
    click.echo(f"Removed {reply['removed']}.")
    _report(reply)


def _progress_bar(label: str) -> tuple[Callable[..., Any], Callable[[], None]]:
    """A click progress bar made once the length is known; and how to close it."""
    bars: list[Any] = []

    def start(total: int | None, held: int) -> Callable[[int], None]:
        # Typed for iterables; here it counts bytes.
        bar = cast(Any, click.progressbar)(length=total, label=label, file=sys.stderr)
        bar.__enter__()
        bar.update(held)
        bars.append(bar)

        def advance(n: int) -> None:
            bar.update(n)

        return advance

    def close() -> None:
        for bar in bars:
            bar.__exit__(None, None, None)

    return start, close


@models.command("pull")
@home_option
@click.argument("url")
@click.option("--sha256", default=None, help="The file's SHA-256 (64 hex digits): checked.")
@click.option("--name", default=None, help="What the mesh calls it (and its file name).")
@click.pass_obj
def models_pull(
    group_home: Path | None,
    home_dir: Path | None,
    url: str,
    sha256: str | None,
    name: str | None,
) -> None:
    """Download a GGUF file from URL into HOME/models/ (resuming an interrupted download),
    then serve it as `models add` does."""
    from node.transport.model_download import download_model

    home_dir = home_dir or group_home
    node_at(home_dir)  # is the node running? Said before a long download, not after it
    directory = Home.resolve(home_dir).root / "models"
    start, close = _progress_bar("downloading")
    try:
        done = asyncio.run(
            download_model(url, directory=directory, name=name, sha256=sha256, progress=start)
        )
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        close()
    if done.already_there:
        click.echo(f"{done.path} is already here (SHA-256 {done.sha256})", err=True)
    else:
        resumed = f", resumed after {done.resumed_from:,}" if done.resumed_from else ""
        click.echo(
            f"Downloaded {done.path}: {done.size:,} bytes{resumed}, SHA-256 {done.sha256}", err=True
        )
    _add(home_dir, done.path, name, ())
