"""Nesting by SVD: rank r_max reproduces the trained function (the training diagonal folded in), every
lower rank is the Eckart-Young optimum of each module's update, and the error falls with the rank."""

import pytest
import torch
from adapter_support import fresh_tiny, random_adapter
from typer.testing import CliRunner

from matryoshka_lora.adapters import build_p, inject, nest, store
from matryoshka_lora.cli import app
from matryoshka_lora.errors import ConfigError

TOKENS = torch.tensor([[5, 9, 17, 3, 44, 2, 90], [1, 77, 8, 8, 120, 64, 33]])
TARGETS = ("q_proj", "v_proj", "down_proj")


def trained_adapter(method, scaling, alpha=1.5):
    """A tiny model with a random adapter on TARGETS (B non-zero) and the Adapter holding its weights."""
    return random_adapter(method, scaling, alpha, targets=TARGETS)


def served_model(adapter):
    model = fresh_tiny()
    store.attach_adapter(model, adapter)
    return model


@pytest.mark.parametrize(
    "method, scaling, source, diagonal",
    [
        ("matryoshka", "none", "p", [4, 3, 2, 2, 1, 1, 1, 1]),
        (
            "matryoshka",
            "rank",
            "p",
            [1 + 1 / 2 + 1 / 4 + 1 / 8] + [1 / 2 + 1 / 4 + 1 / 8] + [1 / 4 + 1 / 8] * 2 + [1 / 8] * 4,
        ),
        ("matryoshka-binary", "none", "p", [1, 3 / 4, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 4, 1 / 4]),
        ("matryoshka", "none", "r_max", [1] * 8),
        ("lora", "sqrt", "p", [8**-0.5] * 8),
        ("dylora", "rank", "p", [1 / 8] * 8),
        ("svd", "none", "p", [1] * 8),
    ],
)
def test_trained_diagonal(method, scaling, source, diagonal):
    manifest = trained_adapter(method, scaling, alpha=2.0)[1].manifest
    torch.testing.assert_close(
        nest.trained_diagonal(manifest, source), 2.0 * torch.tensor(diagonal, dtype=torch.float64)
    )


def test_default_source_and_refusal():
    methods = ("matryoshka", "matryoshka-binary", "lora", "dylora", "svd")
    assert [nest.default_source(m) for m in methods] == ["p", "p", "r_max", "r_max", "r_max"]
    with pytest.raises(ConfigError, match="nesting source"):
        nest.trained_diagonal(trained_adapter("lora", "none")[1].manifest, "full")


@pytest.mark.parametrize(
    "method, scaling",
    [("matryoshka", "none"), ("matryoshka", "sqrt"), ("matryoshka-binary", "rank"), ("lora", "rank")],
)
def test_full_rank_reproduces_the_trained_function(method, scaling):
    model, adapter = trained_adapter(method, scaling)
    if method.startswith("matryoshka"):  # the training forward: x A diag(p) B
        inject.set_p(model, build_p(method, 8, (1, 2, 4, 8), scaling))
        inject.set_inference_ranks(model, None)
    else:
        inject.set_inference_ranks(model, 8)
    expected = model(TOKENS).logits
    nested = nest.nest_adapter(adapter)
    assert (nested.manifest.method, nested.manifest.scaling, nested.manifest.alpha) == ("svd", "none", 1.0)
    serving = served_model(nested)
    inject.set_inference_ranks(serving, 8)
    torch.testing.assert_close(serving(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_every_prefix_is_the_eckart_young_optimum():
    _, adapter = trained_adapter("matryoshka", "none")
    diagonal = nest.trained_diagonal(adapter.manifest, "p")
    for path, (lora_A, lora_B) in adapter.weights.items():
        delta = (lora_A.double() * diagonal) @ lora_B.double()
        singular = torch.linalg.svdvals(delta)
        nested_A, nested_B = nest.svd_nest(lora_A, lora_B, diagonal)
        errors = []
        for k in range(9):
            approx = nested_A[:, :k].double() @ nested_B[:k].double()
            errors.append(float(torch.linalg.matrix_norm(delta - approx)))
            assert errors[-1] == pytest.approx(float(singular[k:].square().sum().sqrt()), rel=1e-4, abs=1e-5), path
        assert all(a > b for a, b in zip(errors, errors[1:])), path
        assert nest.truncation_error(lora_A, lora_B, diagonal, 8) < 1e-5
        assert nest.truncation_error(lora_A, lora_B, diagonal, 1) > nest.truncation_error(lora_A, lora_B, diagonal, 4)


def test_nested_factors_are_balanced_and_ordered():
    """sqrt(S) on both sides: column k of A' and row k of B' have the same norm, decreasing in k."""
    _, adapter = trained_adapter("lora", "none")
    lora_A, lora_B = next(iter(adapter.weights.values()))
    nested_A, nested_B = nest.svd_nest(lora_A, lora_B, torch.ones(8, dtype=torch.float64))
    col, row = nested_A.norm(dim=0), nested_B.norm(dim=1)
    torch.testing.assert_close(col, row, atol=1e-5, rtol=1e-4)
    assert all(a >= b for a, b in zip(col.tolist(), col.tolist()[1:]))


def test_cli_nest_round_trip(tmp_path):
    _, adapter = trained_adapter("matryoshka", "none")
    src = store.save_adapter(tmp_path / "m", adapter.manifest, adapter.weights)
    result = CliRunner().invoke(app, ["nest", str(src), "--out", str(tmp_path / "n"), "--name", "t-nested"])
    assert result.exit_code == 0, result.output
    loaded = store.load_adapter(tmp_path / "n")
    assert loaded.manifest.name == "t-nested" and loaded.manifest.method == "svd"
    assert "matryoshka" in loaded.manifest.notes
    expected = nest.nest_adapter(adapter).weights
    for path, (lora_A, lora_B) in loaded.weights.items():
        torch.testing.assert_close(lora_A, expected[path][0])
        torch.testing.assert_close(lora_B, expected[path][1])
    bad = CliRunner().invoke(app, ["nest", str(src), "--out", str(tmp_path / "x"), "--source", "full"])
    assert bad.exit_code != 0


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_peft_export_of_a_nested_adapter_serves_the_same_function(tmp_path, rank):
    """A nested adapter's rank-r slice exported as PEFT gives the logits of our own forward at rank r."""
    from peft import PeftModel

    from matryoshka_lora.adapters import peft_io

    _, adapter = trained_adapter("matryoshka", "sqrt")
    nested = nest.nest_adapter(adapter)
    path = store.save_adapter(tmp_path / "n", nested.manifest, nested.weights)
    ours = served_model(nested)
    inject.set_inference_ranks(ours, rank)
    peft_model = PeftModel.from_pretrained(fresh_tiny(), str(peft_io.export_peft(path, rank, tmp_path / "peft"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(TOKENS).logits, ours(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_cli_nest_bf16_halves_the_file_and_serves_within_bf16_rounding(tmp_path):
    model, adapter = trained_adapter("lora", "none")
    src = store.save_adapter(tmp_path / "m", adapter.manifest, adapter.weights)
    for flags, out in (([], "f32"), (["--bf16"], "bf16")):
        assert CliRunner().invoke(app, ["nest", str(src), "--out", str(tmp_path / out), *flags]).exit_code == 0
    f32, bf16 = (
        (tmp_path / "f32" / store.WEIGHTS_FILE).stat().st_size,
        (tmp_path / "bf16" / store.WEIGHTS_FILE).stat().st_size,
    )
    assert bf16 < 0.6 * f32
    loaded = store.load_adapter(tmp_path / "bf16")
    assert all(a.dtype == torch.bfloat16 for a, _ in loaded.weights.values())
    inject.set_inference_ranks(model, 8)
    serving = served_model(loaded)
    inject.set_inference_ranks(serving, 8)
    torch.testing.assert_close(serving(TOKENS).logits, model(TOKENS).logits, atol=2e-2, rtol=2e-2)


def test_fold_only_keeps_the_trained_order_and_the_full_function():
    model, adapter = trained_adapter("matryoshka", "none")
    folded = nest.nest_adapter(adapter, svd=False)
    diagonal = nest.trained_diagonal(adapter.manifest, "p")
    for path, (lora_A, lora_B) in adapter.weights.items():
        torch.testing.assert_close(folded.weights[path][0], (lora_A.double() * diagonal).float())
        torch.testing.assert_close(folded.weights[path][1], lora_B)
    inject.set_p(model, build_p("matryoshka", 8, (1, 2, 4, 8), "none"))
    inject.set_inference_ranks(model, None)
    serving = served_model(folded)
    inject.set_inference_ranks(serving, 8)
    torch.testing.assert_close(serving(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=1e-5)


def random_covariance(n: int, seed: int) -> torch.Tensor:
    """A full-rank, strongly anisotropic covariance (what real activations look like)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def weighted_error(covariance, delta, approx) -> float:
    """sqrt(E||x (delta - approx)||^2) = sqrt(tr(E^T C E))."""
    e = delta - approx
    return float(torch.trace(e.T @ covariance @ e).clamp_min(0).sqrt())


@pytest.mark.parametrize("seed", [0, 1])
def test_whitened_prefixes_are_optimal_in_the_input_norm_and_the_full_rank_is_exact(seed):
    _, adapter = trained_adapter("matryoshka", "none")
    diagonal = nest.trained_diagonal(adapter.manifest, "p")
    for path, (lora_A, lora_B) in adapter.weights.items():
        cov = random_covariance(lora_A.shape[0], seed)
        damp = 1e-6
        delta = (lora_A.double() * diagonal) @ lora_B.double()
        white_A, white_B = nest.whitened_nest(lora_A.double(), lora_B.double(), diagonal, cov, damp)
        plain_A, plain_B = nest.svd_nest(lora_A.double(), lora_B.double(), diagonal)
        torch.testing.assert_close(white_A @ white_B, delta, atol=1e-9, rtol=1e-7)
        chol = nest.cholesky_factor(cov, damp)
        tail = torch.linalg.svdvals(chol.T @ delta)
        ridge = cov + damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=torch.float64)
        for k in range(1, 8):
            white = weighted_error(ridge, delta, white_A[:, :k] @ white_B[:k])
            plain = weighted_error(ridge, delta, plain_A[:, :k] @ plain_B[:k])
            assert white == pytest.approx(float(tail[k:].square().sum().sqrt()), rel=1e-6), (path, k)
            assert white <= plain * (1 + 1e-9), (path, k)


def test_whitened_nest_with_identity_covariance_is_the_plain_svd():
    _, adapter = trained_adapter("lora", "none")
    lora_A, lora_B = next(iter(adapter.weights.values()))
    d = torch.ones(8, dtype=torch.float64)
    eye = torch.eye(lora_A.shape[0], dtype=torch.float64)
    white_A, white_B = nest.whitened_nest(lora_A.double(), lora_B.double(), d, eye, damp=1e-12)
    plain_A, plain_B = nest.svd_nest(lora_A.double(), lora_B.double(), d)
    for k in (1, 3, 8):
        torch.testing.assert_close(white_A[:, :k] @ white_B[:k], plain_A[:, :k] @ plain_B[:k], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize(
    "covariances, damp, match",
    [({}, 0.01, "modules missing"), (None, 0.0, "damp")],
)
def test_nest_by_activations_refuses(covariances, damp, match):
    _, adapter = trained_adapter("lora", "none")
    if covariances is None:
        covariances = {p: torch.eye(a.shape[0]) for p, (a, _) in adapter.weights.items()}
    with pytest.raises(ConfigError, match=match):
        nest.nest_adapter(adapter, covariances=covariances, damp=damp)


def test_cli_nest_by_activations_keeps_the_full_function_and_reorders_the_slices(tmp_path, tiny_model_dir):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    src = save_random_adapter(load_base_model(tiny_model_dir)[0], tmp_path / "m", "m", 8, seed=3, std=0.3)
    adapter = store.load_adapter(src)
    args = ["nest", str(src), "--out", str(tmp_path / "w"), "--activations", "reverse", "--num-calib", "6"]
    result = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    white = store.load_adapter(tmp_path / "w")
    assert "input-covariance" in white.manifest.notes
    plain = nest.nest_adapter(adapter)
    for path, (lora_A, lora_B) in white.weights.items():
        plain_A, plain_B = plain.weights[path]
        torch.testing.assert_close(lora_A @ lora_B, plain_A @ plain_B, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(lora_A[:, :1] @ lora_B[:1], plain_A[:, :1] @ plain_B[:1], atol=1e-4)
