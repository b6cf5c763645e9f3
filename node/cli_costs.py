"""`allerac usage --cost`: the usage per route, priced with the config's `[prices]`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import click

from mesh.errors import ConfigError, MeshError
from mesh.ledger.costs import costs
from mesh.ledger.records import UsageRow
from node.store.config_file import read_config_file
from node.store.home import Home

EXAMPLE = "[prices]\\nlocal = 0.0\\nlan = 0.0\\nrelay = 0.0\\ncloud = 0.002\\nhosted = 0.01"


def _prices(home: Home) -> tuple[dict[str, float], str]:
    if not home.config_file.is_file():
        raise ConfigError(
            f"no config file {home.config_file} to read [prices] from; add one such as:\n{EXAMPLE}"
        )
    settings = read_config_file(home.config_file)
    prices = dict(settings.get("prices", ()))
    if not prices:
        raise ConfigError(f"{home.config_file} sets no [prices]; add them, e.g.:\n{EXAMPLE}")
    return prices, str(settings.get("currency", ""))


def print_costs(home: Home, rows: Sequence[UsageRow], *, as_json: bool) -> None:
    try:
        prices, currency = _prices(home)
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    priced = costs(rows, prices)
    total = sum(r.cost or 0.0 for r in priced)
    hosted = [r.hosted_cost for r in priced if r.hosted_cost is not None]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "currency": currency,
                    "per_tokens": 1000,
                    "prices": prices,
                    "rows": [dataclasses.asdict(r) for r in priced],
                    "total": total,
                    "hosted_total": sum(hosted) if hosted else None,
                },
                indent=2,
            )
        )
        return
    unit = f" {currency}" if currency else ""
    click.echo(f"{'route':8} {'requests':>9} {'tokens':>12} {'cost':>12} {'on the hosted API':>18}")
    for r in priced:
        shown = f"{r.cost:.4f}" if r.cost is not None else "no price"
        there = f"{r.hosted_cost:.4f}" if r.hosted_cost is not None else "-"
        click.echo(f"{r.route:8} {r.requests:9} {r.tokens:12} {shown:>12} {there:>18}")
    if not priced:
        click.echo("no usage recorded in this period")
    line = f"total{unit}: {total:.4f}"
    if hosted:
        line += f" (the same tokens on the hosted API: {sum(hosted):.4f})"
    click.echo(line)
