"""`matryoshka-lora plot`'s merge of eval results: which adapters, under which labels, and clear refusals."""

import json

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.training.plots import merge_results, plot_rank_curves


def result(names, base=0.1):
    adapters = [{"name": n, "ranks": [1, 2], "accuracy": {"1": 0.2, "2": 0.4}, "aurac_log2": 0.3} for n in names]
    return {"task": "reverse", "num_test": 10, "base_accuracy": base, "adapters": adapters}


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result(["raw", "nested"])))
    b.write_text(json.dumps(result(["other"], base=0.5)))
    return str(a), str(b)


@pytest.mark.parametrize(
    "specs, names",
    [
        (["{a}"], ["raw", "nested"]),
        (["{a}#1"], ["nested"]),
        (["{a}#0=paper", "{b}=ours"], ["paper", "ours"]),
        (["{b}", "{a}#1"], ["other", "nested"]),
    ],
)
def test_merge_picks_and_labels(files, specs, names):
    a, b = files
    merged = merge_results([s.format(a=a, b=b) for s in specs])
    assert [x["name"] for x in merged["adapters"]] == names
    assert merged["base_accuracy"] == (0.5 if specs[0].startswith("{b}") else 0.1)  # the first file's


@pytest.mark.parametrize(
    "spec, match", [("{a}#5", "adapter index"), ("{a}#x", "adapter index"), ("nope.json", "result file")]
)
def test_merge_refuses(files, spec, match):
    with pytest.raises(ConfigError, match=match):
        merge_results([spec.format(a=files[0])])


def test_the_merged_result_plots(files, tmp_path):
    out = plot_rank_curves(merge_results([files[0], files[1]]), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
