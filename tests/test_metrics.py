"""aurac: hand-computed values on both axes, and every refusal."""

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.metrics import aurac


@pytest.mark.parametrize(
    "ranks, accs, axis, expected",
    [
        ([4], [0.7], "log2", 0.7),
        ([4], [0.7], "linear", 0.7),
        ([1, 2, 4, 8], [0.5, 0.5, 0.5, 0.5], "log2", 0.5),
        # log2 x = 0, 1, 2, 3: trapezoids (0.1+0.3)/2 + (0.3+0.5)/2 + (0.5+0.9)/2 = 0.2+0.4+0.7 = 1.3, / 3
        ([1, 2, 4, 8], [0.1, 0.3, 0.5, 0.9], "log2", 1.3 / 3),
        # linear x = 1, 2, 4, 8: 1*0.2 + 2*0.4 + 4*0.7 = 3.8, / 7
        ([1, 2, 4, 8], [0.1, 0.3, 0.5, 0.9], "linear", 3.8 / 7),
        # log2 x = 1, 4: one trapezoid, the mean of the two ends
        ([2, 16], [0.2, 0.6], "log2", 0.4),
        # log2 x = 0, 2, 4 (1, 4, 16): 2*(0+1)/2 + 2*(1+1)/2 = 3, / 4
        ([1, 4, 16], [0.0, 1.0, 1.0], "log2", 0.75),
        # linear x = 1, 4, 16: 3*0.5 + 12*1 = 13.5, / 15
        ([1, 4, 16], [0.0, 1.0, 1.0], "linear", 0.9),
    ],
)
def test_aurac_hand_computed(ranks, accs, axis, expected):
    assert aurac(ranks, accs, axis=axis) == pytest.approx(expected)


@pytest.mark.parametrize(
    "ranks, accs, axis",
    [
        ([], [], "log2"),
        ([1, 2], [0.5], "log2"),
        ([2, 1], [0.5, 0.5], "log2"),
        ([1, 1], [0.5, 0.5], "linear"),
        ([0, 2], [0.5, 0.5], "log2"),
        ([1, 2], [0.5, 0.5], "ln"),
        ([1, 2], [0.5, float("nan")], "log2"),
    ],
)
def test_aurac_rejects(ranks, accs, axis):
    with pytest.raises(ConfigError):
        aurac(ranks, accs, axis=axis)
