"""Offline batch planning (LPT makespan packing): every request placed once, the lower bound never
above the plan, the plan within 4/3 of the brute-force optimum on small random instances, and
longer requests started first."""

from __future__ import annotations

import itertools
import random

import pytest

from services.router.batch_plan import CostModel, Slot, lower_bound_s, plan_lpt

pytestmark = pytest.mark.unit


def _slots(n: int) -> list[Slot]:
    return [Slot(i % 2, i // 2) for i in range(n)]


def _optimum(costs: list[float], slots: int) -> float:
    best = float("inf")
    for assignment in itertools.product(range(slots), repeat=len(costs)):
        loads = [0.0] * slots
        for cost, s in zip(costs, assignment):
            loads[s] += cost
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_lpt_is_within_four_thirds_of_the_optimum_and_above_the_bound(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 10.0) for _ in range(rng.randint(1, 8))]
    slots = rng.randint(1, 3)
    plan = plan_lpt(costs, _slots(slots))
    assert sorted(i for jobs in plan.jobs for i in jobs) == list(range(len(costs)))
    for jobs, load in zip(plan.jobs, plan.loads_s):
        assert load == pytest.approx(sum(costs[i] for i in jobs))
    optimum = _optimum(costs, slots)
    assert plan.lower_bound_s <= optimum + 1e-9 <= plan.makespan_s + 1e-9
    assert plan.makespan_s <= 4 / 3 * optimum + 1e-9


def test_longest_first_and_the_classic_bad_case():
    plan = plan_lpt([3, 3, 2, 2, 2], _slots(2))  # LPT: 7 vs the optimum 6
    assert plan.jobs == ((0, 2, 4), (1, 3)) and plan.makespan_s == 7 and plan.lower_bound_s == 6


def test_bound_costs_and_errors():
    assert lower_bound_s([], 4) == 0.0
    assert lower_bound_s([1, 1, 10], 4) == 10
    assert CostModel(0.001, 0.02).seconds(500, 10) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="at least one decode slot"):
        plan_lpt([1.0], [])
