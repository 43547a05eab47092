"""Built-in tasks: fixed train/dev/test splits and an exact-match answer parser.

Two kinds, one API (`task_examples(name, split, num)`, `score`); the `TASKS` table names every task:

- generated (no `source`): made in code from a seeded `random.Random`, so the same
  (task, split, size) gives the same examples on every machine. The test split is drawn from its own
  seed, dev from another, and train skips the first 1000 test and 500 dev prompts.
- dataset (a `source`): rows of a real dataset that installs offline (`datasets.py`), split once by a
  fixed seed; train/dev/test never share a row.

Scoring (`score`): the model's completion is parsed with the task's parser and compared, as a string,
to the parsed reference answer. The parsers are documented on each task; all of them:

    text = completion.strip().splitlines()[0] if non-empty else ""   # the first line only
    text = lower-case, runs of whitespace -> one space, trailing "." removed
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from matryoshka_lora.errors import ConfigError, check_count
from matryoshka_lora.training import datasets

TEST_SEED = 1_000_003  # the test split's seed, fixed for every task
DEV_SEED = 2_000_003  # the dev split's seed (generated tasks)
SPLITS = datasets.SPLITS
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A generator of (prompt, answer) pairs and the parser that turns a completion into an answer."""

    name: str
    description: str
    make: Callable[[random.Random], Example] | None  # generated tasks
    parse: Callable[[str], str]
    max_new_tokens: int = 16
    source: datasets.DatasetSource | None = None  # dataset tasks


def first_line(text: str) -> str:
    """The documented normalisation shared by every parser (see the module docstring)."""
    text = text.strip()
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"\s+", " ", line.lower()).strip()
    return line.rstrip(".").strip()


def parse_int(text: str) -> str:
    """The first integer in the first line ("The answer is 936." -> "936"); "" if there is none."""
    match = _INT.search(first_line(text))
    return match.group(0) if match else ""


def parse_int_list(text: str) -> str:
    """Every integer of the first line, joined by ", " ("[7, 15 ,42]" -> "7, 15, 42")."""
    return ", ".join(_INT.findall(first_line(text)))


def parse_letters(text: str) -> str:
    """The letters of the first line, space-separated, lower-case ("D B U." / "dbu" -> "d b u")."""
    return " ".join(ch for ch in first_line(text) if ch.isalpha())


def parse_last_int(text: str) -> str:
    """The last integer of the first line, thousands separators dropped ("91 + 5 = 1,096." -> "1096")."""
    found = _INT.findall(re.sub(r"(?<=\d),(?=\d{3})", "", first_line(text)))
    return found[-1] if found else ""


def parse_label(labels: tuple[str, ...]) -> Callable[[str], str]:
    """The first of `labels` that appears as a word in the first line ("It is Positive." -> "positive")."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, labels)) + r")\b")

    def parse(text: str) -> str:
        match = pattern.search(first_line(text))
        return match.group(1) if match else ""

    return parse


def _add3(rng: random.Random) -> Example:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return Example(f"What is {a} + {b}?", str(a + b))


def _sort5(rng: random.Random) -> Example:
    nums = rng.sample(range(10, 100), 5)
    shown = ", ".join(map(str, nums))
    return Example(f"Sort in ascending order: {shown}", ", ".join(map(str, sorted(nums))))


def _caesar(rng: random.Random) -> Example:
    letters = [chr(ord("a") + rng.randrange(26)) for _ in range(4)]
    shifted = [chr(ord("a") + (ord(ch) - ord("a") + 1) % 26) for ch in letters]
    return Example(f"Shift each letter one step forward in the alphabet: {' '.join(letters)}", " ".join(shifted))


def _reverse(rng: random.Random) -> Example:
    letters = [chr(ord("a") + rng.randrange(26)) for _ in range(5)]
    return Example(f"Reverse this list of letters: {' '.join(letters)}", " ".join(reversed(letters)))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("add3", "add two 3-digit numbers; answer = the first integer", _add3, parse_int, 8),
        Task("sort5", "sort five 2-digit numbers; answer = the integers of the first line", _sort5, parse_int_list, 24),
        Task(
            "caesar",
            "shift 4 letters by one (z -> a); answer = the letters of the first line",
            _caesar,
            parse_letters,
            16,
        ),
        Task("reverse", "reverse 5 letters; answer = the letters of the first line", _reverse, parse_letters, 16),
        Task(
            "arithmetic",
            "allenai/basic_arithmetic: 'Calculate 5 + 91 =' (+ - * /, 1-6 digits); answer = the last "
            "integer of the first line",
            None,
            parse_last_int,
            12,
            datasets.BASIC_ARITHMETIC,
        ),
        Task(
            "sst2",
            "glue/sst2: is a film-review sentence positive or negative; answer = the first label word",
            None,
            parse_label(("positive", "negative")),
            4,
            datasets.SST2,
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError("task", name, sorted(TASKS))
    return TASKS[name]


def task_examples(name: str, split: str, num: int, seed: int = 0) -> list[Example]:
    """The first `num` examples of a task's split (module docstring).

    generated: test = the first `num` distinct prompts drawn with TEST_SEED (every `seed` alike),
               dev = the same with DEV_SEED, train = distinct prompts drawn with `seed`.
    dataset:   the split's first `num` rows (train shuffled by a non-zero `seed`); fewer when the
               split is smaller, which the caller sees in len(result).
    """
    task = get_task(name)
    if split not in SPLITS:
        raise ConfigError("split", split, list(SPLITS))
    check_count("number of examples", num)
    if task.source is not None:
        pairs = datasets.split_pairs(task.source, split, seed=seed)
        return [Example(prompt, answer) for prompt, answer in pairs[:num]]
    if split == "test":
        return _distinct(task, random.Random(TEST_SEED), num, exclude=set())
    test = {ex.prompt for ex in _distinct(task, random.Random(TEST_SEED), 1000, exclude=set())}
    if split == "dev":
        return _distinct(task, random.Random(DEV_SEED), num, exclude=test)
    dev = {ex.prompt for ex in _distinct(task, random.Random(DEV_SEED), 500, exclude=test)}
    return _distinct(task, random.Random(seed), num, exclude=test | dev)


def _distinct(task: Task, rng: random.Random, num: int, exclude: set[str]) -> list[Example]:
    seen, out = set(exclude), []
    for _ in range(num * 50):
        example = task.make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
            if len(out) == num:
                return out
    raise ConfigError(f"number of distinct {task.name} examples", num, f"at most {len(out)}")


def score(task: Task, completion: str, answer: str) -> bool:
    """Exact match of the parsed completion against the parsed reference answer."""
    expected = task.parse(answer)
    return expected != "" and task.parse(completion) == expected
