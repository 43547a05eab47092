"""Incremental detokenisation (multi-byte safe) and stop strings."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.detokenizer import IncrementalDetokenizer, StopStringFilter


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from matryoshka_lora.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize(
    "sample", ["Hello, world!", "naïve café — 東京タワー 🚀🎉", "  two  spaces\nnew line", "ünïcödé"]
)
def test_deltas_concatenate_to_the_full_decode(tokenizer, sample):
    prompt = tokenizer("Say:")["input_ids"]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.step(t) for t in ids]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    "stop, deltas, expected_out, expected_hit",
    [
        (("END",), ["abc", "dE", "ND more"], ["abc", "d", ""], [False, False, True]),
        (("\n\n",), ["a\n", "\nb"], ["a", ""], [False, True]),
        (("xyz",), ["ab", "xy", "q"], ["ab", "", "xyq"], [False, False, False]),  # held back, then released
        (("b", "cd"), ["acd", "b"], ["a"], [True]),  # earliest stop wins
        ((), ["a", "b"], ["a", "b"], [False, False]),
    ],
)
def test_stop_filter(stop, deltas, expected_out, expected_hit):
    f = StopStringFilter(stop)
    outs, hits = [], []
    for d in deltas:
        out, hit = f.push(d)
        outs.append(out), hits.append(hit)
        if hit:
            break
    assert outs == expected_out and hits == expected_hit


def test_flush_releases_held_text():
    f = StopStringFilter(("xyz",))
    assert f.push("abx") == ("ab", False)
    assert f.flush() == "x"
