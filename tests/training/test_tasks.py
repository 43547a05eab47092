"""Built-in tasks: fixed disjoint splits, and the documented exact-match parsers."""

from __future__ import annotations

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.training import tasks


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_splits_are_fixed_and_disjoint(name):
    test_a = tasks.task_examples(name, "test", 50)
    assert test_a == tasks.task_examples(name, "test", 50, seed=7)  # the test split ignores the seed
    train = tasks.task_examples(name, "train", 200, seed=0)
    assert train == tasks.task_examples(name, "train", 200, seed=0)
    assert train != tasks.task_examples(name, "train", 200, seed=1)
    test, dev = tasks.task_examples(name, "test", 1000), tasks.task_examples(name, "dev", 500)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in dev}
    assert not {ex.prompt for ex in dev} & {ex.prompt for ex in test}
    assert len({ex.prompt for ex in train}) == 200
    task = tasks.get_task(name)
    assert all(tasks.score(task, ex.answer, ex.answer) for ex in train)  # the reference parses to itself


@pytest.mark.parametrize(
    "name, completion, answer, correct",
    [
        ("add3", "1405", "1405", True),
        ("add3", " The answer is 1405.\nExplanation: 628 + 777", "1405", True),
        ("add3", "628 + 777 = 1405", "1405", False),  # the FIRST integer is the answer
        ("add3", "", "1405", False),
        ("add3", "\n\n1405", "1405", True),  # leading blank lines are stripped
        ("sort5", "[17, 28,39 , 51, 90].", "17, 28, 39, 51, 90", True),
        ("sort5", "17, 28, 39, 51", "17, 28, 39, 51, 90", False),
        ("sort5", "17, 28, 39, 51, 90\n99", "17, 28, 39, 51, 90", True),  # only the first line counts
        ("caesar", "D B U.", "d b u", True),
        ("caesar", "dbu", "d b u", True),
        ("caesar", "d b v", "d b u", False),
        ("reverse", "t r e w q", "t r e w q", True),
        ("reverse", "The answer: t r e w q", "t r e w q", False),  # extra letters break the match
        ("arithmetic", "96", "96", True),
        ("arithmetic", "5 + 91 = 96.", "96", True),  # the LAST integer of the first line
        ("arithmetic", "The answer is -42", "-42", True),
        ("arithmetic", "1,096", "1096", True),  # thousands separators dropped
        ("arithmetic", "95\n96", "96", False),  # only the first line counts
        ("arithmetic", "ninety-six", "96", False),
        ("sst2", "positive", "positive", True),
        ("sst2", "The sentiment of this movie review is Negative.", "negative", True),  # the first label word
        ("sst2", "positive, not negative", "negative", False),
        ("sst2", "positively", "positive", False),  # whole words only
        ("sst2", "\nnegative", "negative", True),
        ("sst2", "neutral", "negative", False),
    ],
)
def test_score_table(name, completion, answer, correct):
    assert tasks.score(tasks.get_task(name), completion, answer) is correct


@pytest.mark.parametrize(
    "call, what",
    [
        (lambda: tasks.get_task("nope"), "task"),
        (lambda: tasks.task_examples("add3", "valid", 3), "split"),
        (lambda: tasks.task_examples("add3", "test", 0), "number of examples"),
    ],
)
def test_bad_arguments(call, what):
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.what == what
