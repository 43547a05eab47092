"""The engine reaches the budget machinery only through BudgetController's hooks, as its docstring says."""

from __future__ import annotations

import time

import pytest

from ..engine_support import request, run


class Spy:
    """Wraps the engine's controller, counting each hook's calls."""

    HOOKS = ("choose", "observe_step", "observe_finished")

    def __init__(self, controller):
        self.controller = controller
        self.calls = {h: 0 for h in self.HOOKS}
        for hook in self.HOOKS:
            setattr(self, hook, self._counted(hook))

    def _counted(self, hook):
        real = getattr(self.controller, hook)

        def call(*args, **kwargs):
            self.calls[hook] += 1
            return real(*args, **kwargs)

        return call

    def __getattr__(self, name):  # margin(), cost_model, ...
        return getattr(self.controller, name)


def test_each_hook_runs_when_the_docstring_says(make_engine):
    engine = make_engine()
    spy = engine.budget = Spy(engine.budget)
    run(engine, [request(i, adapter="alpha", rank=2 + i % 2) for i in range(6)])
    assert spy.calls["choose"] == 6
    assert spy.calls["observe_step"] == spy.calls["observe_finished"] == engine.num_steps > 0
    assert engine.stats().budget_latency_margin == spy.controller.margin() == 1.0


def test_a_refused_request_counts_no_arrival(make_engine):
    from matryoshka_lora.errors import UnknownAdapterError

    engine = make_engine()
    with pytest.raises(UnknownAdapterError):
        engine.add_request(request(0, adapter="nope"), lambda e: None)
    assert engine.budget.arrivals.prefill_seconds.rate(time.perf_counter()) == 0.0
    engine.add_request(request(1, adapter="alpha"), lambda e: None)
    assert engine.budget.arrivals.prefill_seconds.rate(time.perf_counter()) > 0


def test_the_warm_up_fits_the_cost_model_and_gives_its_scratch_back(make_engine):
    engine = make_engine()
    free_before, names_before = engine.kv.num_free_slots, engine.adapters.names()
    coef_before = engine.budget.cost_model.coef.copy()
    engine.warmup(repeats=1)
    assert (engine.budget.cost_model.coef != coef_before).any()
    assert engine.kv.num_free_slots == free_before
    assert engine.adapters.names() == names_before


@pytest.mark.parametrize(
    "layers_off, ok",
    [((), True), (("typical",), True), (("headroom",), True), (("typical", "headroom"), True), (("hold",), False)],
)
def test_budget_layers_off_are_checked_where_they_enter(layers_off, ok):
    from matryoshka_lora.engine.config import BUDGET_LAYERS, EngineConfig
    from matryoshka_lora.errors import ConfigError

    if ok:
        assert EngineConfig(budget_layers_off=layers_off).budget_layers_off == layers_off
    else:
        with pytest.raises(ConfigError) as info:
            EngineConfig(budget_layers_off=layers_off)
        assert info.value.allowed == list(BUDGET_LAYERS)
