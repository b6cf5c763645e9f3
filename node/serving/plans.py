"""Users' plans at the entry node: which models a user's plan lets them use (403 naming
the plan otherwise), and the plan's rank, the hook for serving higher plans first when a
box is full. The rules are `mesh.quota.plans`'s; the plan table is the defaults with this
box's `[plans.NAME]` on top, replaced when the configuration is reloaded."""

from __future__ import annotations

from mesh.errors import InvalidRequest, ModelNotInPlan, Overloaded
from mesh.inference import InferenceRequest, Load, ModelInfo
from mesh.quota.plans import Plan, places_kept, plan_table, refusal
from mesh.quota.rules import Quota
from node.store.users_admin import UsersAdmin


class PlanGate:
    def __init__(self, *, users: UsersAdmin, overrides: tuple[Plan, ...] = ()) -> None:
        self._users = users
        self.plans: dict[str, Plan] = {}
        self.configure(overrides)

    def configure(self, overrides: tuple[Plan, ...]) -> None:
        self.plans = plan_table({p.name: p for p in overrides})
        self.top_rank = max((p.rank for p in self.plans.values()), default=0)

    def rank_of(self, user: str) -> int:
        """Where a user's requests stand when a box is full: their plan's rank; the owner,
        users without a plan and plans this box does not know stand with the top plan."""
        record = self._users.get(user) if user else None
        chosen = self.plans.get(record.quota.plan) if record is not None else None
        return chosen.rank if chosen is not None else self.top_rank

    def take_place(self, request: InferenceRequest, load: Load) -> None:
        """Before a request takes a place at one of this box's models (`LocalModels.open`):
        refuse it (Overloaded, so the mesh tries another box) when the places left are kept
        for higher plans."""
        rank = self.rank_of(request.user)
        kept = places_kept(load, rank, self.top_rank)
        if kept:
            raise Overloaded(
                f"model {request.model!r} is nearly full here: its last {kept} place(s) are kept "
                "for higher plans; retry shortly"
            )

    def quota_of(self, name: str) -> Quota:
        """The quota a user on plan `name` gets (what `user add --plan` stores)."""
        chosen = self.plans.get(name)
        if chosen is None:
            raise InvalidRequest(
                f"no plan called {name!r}; the plans are {', '.join(sorted(self.plans))}",
                param="plan",
            )
        return chosen.quota

    def check(self, request: InferenceRequest, info: ModelInfo | None) -> int:
        """Refuse a model the request's user's plan does not include; returns the plan's
        rank (0 for the owner and users without a plan). `info`: the model as the mesh
        serves it (None: nobody does, which the scheduler reports)."""
        record = self._users.get(request.user) if request.user else None
        if record is None or not record.quota.plan:
            return 0
        chosen = self.plans.get(record.quota.plan)
        if chosen is None:
            raise ModelNotInPlan(
                f"user {request.user!r} is on the plan {record.quota.plan!r}, which this box "
                "does not define; add [plans." + record.quota.plan + "] to its config",
                param="model",
            )
        if info is not None:
            why = refusal(chosen, info)
            if why is not None:
                raise ModelNotInPlan(
                    f"{why}: ask for a smaller model or move to a bigger plan", param="model"
                )
        return chosen.rank


def model_info(model: str, served: list[tuple[ModelInfo, list[str]]]) -> ModelInfo | None:
    """The model a request names (by name or alias), as the mesh serves it."""
    for info, _ in served:
        if model == info.name or model in info.aliases:
            return info
    return None
