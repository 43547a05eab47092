"""PackedLinear == nn.Linear's math for every row count, with and without bias, packed or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matryoshka_lora.engine.linear import PackedLinear


@pytest.mark.parametrize("num_rows", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
def test_packed_linear_equals_linear(num_rows, with_bias, pack):
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(num_rows, 64, generator=gen)
    layer = PackedLinear(weight, bias, batch_size_hint=16, pack=pack)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_packs_on_cpu_float32_and_keeps_one_copy():
    layer = PackedLinear(torch.randn(8, 4))
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert layer.packed is not None and layer.weight is None
    assert "packed" in repr(layer)


def test_other_dtypes_use_the_plain_path():
    layer = PackedLinear(torch.randn(8, 4, dtype=torch.float64))
    assert layer.packed is None
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())
