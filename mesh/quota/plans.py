"""Plans: named bundles of a quota and the models it may use (issue 17 item 7).

Allerac Cloud sells three: Starter (1M tokens a month on cloud hardware, models up to 8B
parameters), Personal (10M, up to 14B) and Pro (50M, every model). They are defaults in
code (`DEFAULT_PLANS`); a box's config may change them or add others with `[plans.NAME]`
(`quota = "cloud=2M/month"`, `max_parameters = "8B"` or `"all"`), see `mesh.config`.

How a plan holds across the mesh: `allerac user add NAME --plan starter` stores the plan's
quota in the user's signed entry, with the plan's name in it (`plan=starter,cloud=1M/month`,
`mesh.quota.rules.Quota.plan`), so every box counts the same tokens (their home keeps
them, as for any quota) and knows the user's plan. Which models a plan may use is asked
where the request comes in (`refusal`): a model over the plan's size gets 403 naming the
plan. A model's size is its parameter count, read from the GGUF by llama.cpp or set with
`parameters` in a model's config (an upstream's model: the node cannot read it); a model
of unknown size is outside every plan with a size cap. `rank` orders plans for the boxes'
queues (higher plans first when a box is full).

Pure: values in, values out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import InvalidRequest
from mesh.inference import Load, ModelInfo
from mesh.quota.rules import PLAN_NAME, Quota, parse_quota

_PARAMETERS = re.compile(r"(?P<n>\d{1,6}(?:\.\d{1,3})?)(?P<unit>[kKmMbBtT])?")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


@dataclass(frozen=True, kw_only=True)
class Plan:
    name: str
    quota: Quota  # carries the plan's name (`Quota.plan`)
    max_parameters: int | None  # None: every model
    rank: int  # higher is served first when a box is full

    def describe(self) -> str:
        size = (
            "every model"
            if self.max_parameters is None
            else f"models up to {show_parameters(self.max_parameters)} parameters"
        )
        limits = ",".join(limit.spec for limit in self.quota.limits) or "unlimited"
        return f"{self.name} ({limits}, {size})"


def parse_parameters(text: str) -> int:
    """'8B' -> 8_000_000_000; '135M', '0.5B', '1.5T'. InvalidRequest when it is none."""
    match = _PARAMETERS.fullmatch(text.strip())
    if match is None:
        raise InvalidRequest(
            f"not a parameter count: {text[:40]!r} (write it like 8B, 135M or 0.5B)",
            param="parameters",
        )
    return int(float(match["n"]) * _UNITS[(match["unit"] or "").lower()])


def show_parameters(count: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= size:
            return f"{count / size:.3f}".rstrip("0").rstrip(".") + unit
    return str(count)


def plan(name: str, quota: str, max_parameters: str | None, rank: int) -> Plan:
    """A plan from its parts as written (InvalidRequest naming what is wrong)."""
    if PLAN_NAME.fullmatch(name) is None:
        raise InvalidRequest(
            f"a plan name is 1-32 lowercase letters, digits or -, starting with a letter; "
            f"got {name[:40]!r}",
            param="plan",
        )
    parsed = parse_quota(quota)
    if parsed.plan:
        raise InvalidRequest("a plan's quota names no plan itself", param="quota")
    return Plan(
        name=name,
        quota=Quota(parsed.limits, name),
        max_parameters=None
        if max_parameters in (None, "all")
        else parse_parameters(max_parameters),
        rank=rank,
    )


DEFAULT_PLANS: Mapping[str, Plan] = {
    p.name: p
    for p in (
        plan("starter", "cloud=1M/month", "8B", 1),
        plan("personal", "cloud=10M/month", "14B", 2),
        plan("pro", "cloud=50M/month", "all", 3),
    )
}


def plan_table(overrides: Mapping[str, Plan]) -> dict[str, Plan]:
    """The defaults, with a box's `[plans.NAME]` on top."""
    return {**DEFAULT_PLANS, **overrides}


def refusal(chosen: Plan, info: ModelInfo) -> str | None:
    """Why a user on `chosen` may not use this model (None: they may)."""
    if chosen.max_parameters is None:
        return None
    limit = show_parameters(chosen.max_parameters)
    if info.parameter_count <= 0:
        return (
            f"the {chosen.name} plan allows models up to {limit} parameters, and the size of "
            f"{info.name!r} is not known (its box can set it with parameters = ... in the "
            "model's config)"
        )
    if info.parameter_count > chosen.max_parameters:
        return (
            f"the {chosen.name} plan allows models up to {limit} parameters; {info.name!r} "
            f"has {show_parameters(info.parameter_count)}"
        )
    return None


def places_kept(load: Load, rank: int, top_rank: int) -> int:
    """When a box is full, higher plans are served first: a model keeps its last free places
    (requests running plus waiting, up to its slots) for higher plans, one per rank below
    the top. A request of `rank` may take a place when more than that many are free; at
    least one place always stays usable by everyone. Returns how many places are kept from
    this request (0: it may take one if any is free)."""
    kept = max(0, min(top_rank - rank, load.slots - 1))
    free = load.slots - load.active_streams - load.queued
    return kept if 0 < free <= kept else 0
