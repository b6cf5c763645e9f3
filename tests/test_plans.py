"""Plans (issue 17 item 7): the pure rules, the config's [plans.NAME] and [prices], and
plans held across two boxes in process (tests/harness.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.config import Flags, node_config, parse_config
from mesh.errors import ConfigError, InvalidRequest, ModelNotInPlan, Overloaded
from mesh.inference import InferenceRequest, ModelInfo, Route, Sampling
from mesh.ledger.costs import costs
from mesh.ledger.records import UsageRow
from mesh.quota.plans import DEFAULT_PLANS, parse_parameters, plan, refusal, show_parameters
from mesh.quota.rules import parse_quota
from mesh.routing.scheduler import Privacy
from mesh.trust.membership import Role
from tests.harness import (
    MODEL,
    NodeSpec,
    Script,
    ScriptedBackend,
    ask,
    counting,
    mesh,
    spend_until_refused,
)
from tests.test_config import FakeBox


def test_the_three_plans_and_their_models() -> None:
    starter, personal, pro = (DEFAULT_PLANS[n] for n in ("starter", "personal", "pro"))
    assert starter.quota.spec == "plan=starter,cloud=1M/month"
    assert personal.quota.spec == "plan=personal,cloud=10M/month"
    assert pro.quota.spec == "plan=pro,cloud=50M/month"
    assert starter.rank < personal.rank < pro.rank
    seven = ModelInfo(name="qwen-7b", parameter_count=7_600_000_000)
    thirty = ModelInfo(name="qwen-32b", parameter_count=32_000_000_000)
    assert refusal(starter, seven) is None
    assert refusal(starter, thirty) == (
        "the starter plan allows models up to 8B parameters; 'qwen-32b' has 32B"
    )
    assert refusal(personal, ModelInfo(name="m", parameter_count=14_000_000_000)) is None
    assert refusal(pro, thirty) is None
    assert "is not known" in str(refusal(starter, ModelInfo(name="upstream")))


def test_a_plan_travels_in_the_quota_spec() -> None:
    quota = parse_quota("plan=starter,cloud=1M/month")
    assert quota.plan == "starter"
    assert parse_quota(quota.spec) == quota
    for bad in ("plan=Starter", "plan=a,plan=b", "plan="):
        with pytest.raises(InvalidRequest, match="names one plan"):
            parse_quota(bad)


@given(st.integers(min_value=1, max_value=10**13))
def test_parameter_counts_read_back_as_shown(count: int) -> None:
    shown = show_parameters(count)
    assert abs(parse_parameters(shown) - count) <= count * 0.001 + 1


def test_parameters_are_clear_errors() -> None:
    assert parse_parameters("8B") == 8_000_000_000
    assert parse_parameters("135M") == 135_000_000
    with pytest.raises(InvalidRequest, match="not a parameter count"):
        parse_parameters("eight billion")


def _config(text: str) -> object:
    box = FakeBox()
    return node_config(
        parse_config(text.encode(), source="config t", base_dir=Path("/"), box=box),
        flags=Flags(),
        box=box,
    )


def test_plans_and_prices_from_the_config() -> None:
    config = _config(
        '[plans.starter]\nquota = "cloud=2M/month"\n'
        '[plans.team]\nquota = "mesh=5M/month,cloud=20M/month"\nmax_parameters = "32B"\nrank = 5\n'
        '[prices]\ncloud = 0.002\nhosted = 0.01\ncurrency = "EUR"\n'
    )
    plans = {p.name: p for p in config.plans}  # type: ignore[attr-defined]
    assert plans["starter"].quota.spec == "plan=starter,cloud=2M/month"
    assert plans["starter"].max_parameters == 8_000_000_000  # the default where not set
    assert plans["team"].quota.spec == "plan=team,mesh=5M/month,cloud=20M/month"
    assert plans["team"].rank == 5
    assert dict(config.prices) == {"cloud": 0.002, "hosted": 0.01}  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"plans\.team\.colour = 'red': unknown key"):
        _config('[plans.team]\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="not a parameter count"):
        _config('[plans.team]\nmax_parameters = "huge"\n')
    with pytest.raises(ConfigError, match=r"prices\.cloud = -1: must be a number"):
        _config("[prices]\ncloud = -1\n")


def test_costs_per_route_against_the_hosted_price() -> None:
    rows = [
        UsageRow(key="local", requests=3, prompt_tokens=1500, completion_tokens=500),
        UsageRow(key="cloud", requests=1, prompt_tokens=600, completion_tokens=400),
    ]
    local, cloud = costs(rows, {"local": 0.0, "cloud": 0.002, "hosted": 0.01})
    assert (local.tokens, local.cost, local.hosted_cost) == (2000, 0.0, 0.02)
    assert (cloud.tokens, cloud.cost, cloud.hosted_cost) == (1000, 0.002, 0.01)
    assert costs(rows[:1], {})[0].cost is None


# --- across two boxes, in process ----------------------------------------------------------------

BIG, SMALL = "qwen-32b", "qwen-7b"


def _request(user: str, model: str, max_tokens: int = 8) -> InferenceRequest:
    return InferenceRequest(
        model=model, prompt="1, 2, 3,", sampling=Sampling(max_tokens=max_tokens), user=user
    )


async def test_plans_hold_across_two_boxes(tmp_path: Path) -> None:
    home = NodeSpec(
        backends=[ScriptedBackend(Script(tokens=counting(8)), model=SMALL, parameters=7 * 10**9)]
    )
    other = NodeSpec(
        backends=[ScriptedBackend(Script(tokens=counting(8)), model=BIG, parameters=32 * 10**9)]
    )
    async with mesh(tmp_path, {"a": home, "b": other}) as m:
        a, b = m["a"], m["b"]
        await a.add_user("sam", plan="starter")
        await a.add_user("pat", plan="pro")
        await m.sync()  # the users (and their plans) reach b
        assert b.users.get("sam").quota.spec == "plan=starter,cloud=1M/month"  # type: ignore[union-attr]
        for entry in (a, b):  # wherever the request comes in
            with pytest.raises(ModelNotInPlan, match="starter plan allows models up to 8B") as err:
                await ask(entry.entry, _request("sam", BIG))
            assert err.value.http_status == 403
            assert (await ask(entry.entry, _request("sam", SMALL))).finished.completion_tokens == 8
            assert (await ask(entry.entry, _request("pat", BIG))).answer.served_by.route in (
                Route.LOCAL,
                Route.LAN,
            )
        assert (await ask(b.entry, _request("", BIG))).finished.completion_tokens == 8  # owner


async def test_a_plans_cloud_tokens_are_counted_at_the_users_home(tmp_path: Path) -> None:
    cloud = NodeSpec(
        backends=[ScriptedBackend(Script(tokens=counting(8)), model=SMALL, parameters=7 * 10**9)],
        role=Role.OVERFLOW,
    )
    async with mesh(tmp_path, {"a": NodeSpec(), "b": NodeSpec(), "cloud": cloud}) as m:
        a, b = m["a"], m["b"]
        tight = plan("starter", "cloud=200/month", "8B", 1)  # [plans.starter] on both boxes
        for node in (a, b):
            node.plans.configure((tight,))
        await a.add_user("sam", plan="starter", privacy=Privacy.ANY)
        await m.sync()
        served, refused = await spend_until_refused(
            b.entry, _request("sam", SMALL), Privacy.ANY, most=50
        )
        assert served
        # Only the cloud serves this model, so the refusal names the cloud node and why.
        assert "user 'sam' is over quota: cloud=200/month on cloud hardware" in refused.message
        assert (
            sum(got.finished.prompt_tokens + got.finished.completion_tokens for got in served)
            <= 200
        )


async def test_a_full_box_keeps_its_last_places_for_higher_plans(tmp_path: Path) -> None:
    backend = ScriptedBackend(Script(tokens=counting(20), pause_after=2), slots=4, parameters=10**9)
    async with mesh(tmp_path, {"a": NodeSpec(backends=[backend])}) as m:
        a = m["a"]
        for user, chosen in (("sam", "starter"), ("pat", "personal"), ("pia", "pro")):
            await a.add_user(user, plan=chosen)
        async with contextlib.AsyncExitStack() as held:

            async def start(user: str) -> None:
                await held.enter_async_context(a.entry.answer(_request(user, MODEL)))

            await start("sam")  # 4 places free: a starter takes one, and another
            await start("sam")
            with pytest.raises(Overloaded, match="last 2 place"):
                await start("sam")  # 2 free: they are kept for personal and pro
            await start("pat")  # personal: only the last place is kept from it
            with pytest.raises(Overloaded, match="last 1 place"):
                await start("pat")
            await start("pia")  # pro takes the last place
            with pytest.raises(Overloaded, match=r"full \(4 of 4 slots\)"):
                await start("")  # full for everyone, the owner included
        assert [r.user for r in backend.asked] == ["sam", "sam", "pat", "pia"]
