"""Fitting the per-rank serving scale on the tiny model: the lowest dev loss wins, c = 1 unless it gains."""

import pytest

from matryoshka_lora.adapters import store
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.models import load_base_model
from matryoshka_lora.training import rank_scales as rs


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter

    model, _ = load_base_model(tiny_model_dir)
    return save_random_adapter(model, tmp_path / "a", "a", 4, seed=5, std=0.3)


def test_fit_picks_the_lowest_loss_and_writes_the_manifest(tiny_model_dir, adapter_dir):
    cfg = rs.FitConfig(
        adapter=adapter_dir,
        task="reverse",
        ranks=(1, 4),
        num_dev=6,
        batch_size=3,
        candidates=(0.5, 1.0, 2.0),
        model=str(tiny_model_dir),
    )
    fitted, losses = rs.fit_rank_scales(cfg)
    assert set(fitted) == set(losses) == {"1", "4"}
    for rank, measured in losses.items():
        best = min(measured, key=measured.get)
        gains = measured[best] < measured["1"] * (1 - cfg.min_gain)
        assert fitted[rank] == (float(best) if gains else 1.0)
    assert len({v for m in losses.values() for v in m.values()}) > 2  # the scale really changes the loss
    manifest = rs.write_rank_scales(adapter_dir, {"1": 2.0, "4": 1.0})
    assert manifest.rank_scales == {"1": 2.0} == store.read_manifest(adapter_dir).rank_scales


def test_no_gain_keeps_one(tiny_model_dir, adapter_dir):
    cfg = rs.FitConfig(
        adapter=adapter_dir,
        task="reverse",
        ranks=(2,),
        num_dev=3,
        candidates=(0.5, 1.0, 2.0),
        min_gain=1.0,
        model=str(tiny_model_dir),
    )
    assert rs.fit_rank_scales(cfg)[0] == {"2": 1.0}


@pytest.mark.parametrize("candidates", [(), (0.5, 2.0), (0.0, 1.0)])
def test_candidates_must_include_one_and_be_positive(adapter_dir, candidates):
    with pytest.raises(ConfigError, match="candidates"):
        rs.FitConfig(adapter=adapter_dir, task="reverse", candidates=candidates).validate()
