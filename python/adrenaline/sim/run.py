"""One simulation from a plain description: cost model, deployment, policy, workload -> summary.

The CLI, the recommender and the studies all go through ``Setup.run`` so a figure in the docs and
a command line give the same number for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from adrenaline.core.profile import Profile
from adrenaline.offload.load_aware import Slo
from adrenaline.sim.cluster import Cluster, Deployment
from adrenaline.sim.cost import AnalyticCost, CostModel
from adrenaline.sim.metrics import Summary, summarize
from adrenaline.sim.policy import make_decider
from adrenaline.sim.profiled import profile_of
from adrenaline.sim.workload import Spec


@dataclass
class Setup:
    cost: CostModel
    dep: Deployment
    policy: str = "static"  # static | load-aware
    ratio: float = 0.7  # static N/M
    max_offloaded: int | None = None
    slo: Slo | None = None
    profile: Profile | None = None  # for load-aware: measured, else tabulated from the analytic model

    def with_(self, **changes) -> Setup:
        """A copy with deployment fields (``offload``, ``prefill``...) or own fields changed."""
        dep = {k: v for k, v in changes.items() if hasattr(self.dep, k)}
        own = {k: v for k, v in changes.items() if k not in dep}
        return replace(self, dep=replace(self.dep, **dep), **own)

    def cluster(self) -> Cluster:
        if not self.dep.offload:
            return Cluster(self.cost, self.dep)
        profile = self.profile
        if self.policy == "load-aware" and profile is None and isinstance(self.cost, AnalyticCost):
            profile = profile_of(self.cost, self.dep.executor_share)
        decider = make_decider(
            self.policy, self.ratio, self.max_offloaded, profile, self.slo, self.dep.decode
        )
        return Cluster(self.cost, self.dep, decider)

    def run(self, specs: list[Spec]) -> tuple[Cluster, Summary]:
        c = self.cluster()
        c.run(specs)
        return c, summarize(c)

    def label(self) -> str:
        d = self.dep
        name = f"{d.prefill}P{d.decode}D"
        if not d.offload:
            return f"{name} plain PD"
        how = "load-aware" if self.policy == "load-aware" else f"ratio {self.ratio:g}"
        return f"{name} offload {how}, executor {d.executor_share:.0%} SMs"
