"""The latency-budget controller: a request's latency budget -> a rank, learned from the steps and requests.

The engine sees one object, `controller.BudgetController`. Behind it, one job per module:
    rank_policy     a request -> its adapter slot and rank (the rule table in its docstring)
    cost_model      step time from step features; a request's latency under the load
    step_features   what a step costs, as numbers the cost model is fitted on
    arrivals        prompt and output tokens/s arriving (the load to come)
    latency_margin  the margin on predictions, learned from how long promised requests took
    calibration     the warm-up: timed synthetic steps -> the cost model's first fit
"""
