"""Built-in tasks: seeded generators with fixed train/test splits and an exact-match answer parser.

Nothing is downloaded: each task makes its examples in code from a seeded `random.Random`, so the
same (task, split, size) always gives the same examples on every machine. The test split is drawn
first from its own seed and the train split skips every test prompt, so no test question is trained on.

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

from matryoshka_lora.errors import ConfigError

TEST_SEED = 1_000_003  # the test split's seed, fixed for every task
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
    make: Callable[[random.Random], Example]
    parse: Callable[[str], str]
    max_new_tokens: int = 16


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
        Task("caesar", "shift 4 letters by one (z -> a); answer = the letters of the first line", _caesar, parse_letters, 16),
        Task("reverse", "reverse 5 letters; answer = the letters of the first line", _reverse, parse_letters, 16),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError("task", name, sorted(TASKS))
    return TASKS[name]


def task_examples(name: str, split: str, num: int, seed: int = 0) -> list[Example]:
    """`num` distinct examples of a task's split.

    test:  the first `num` distinct prompts drawn with TEST_SEED (the same for every `seed`).
    train: distinct prompts drawn with `seed`, skipping the first 1000 test prompts.
    """
    task = get_task(name)
    if split not in ("train", "test"):
        raise ConfigError("split", split, ["train", "test"])
    if num < 1:
        raise ConfigError("number of examples", num, ">= 1")
    if split == "test":
        return _distinct(task, random.Random(TEST_SEED), num, exclude=set())
    held_out = {ex.prompt for ex in _distinct(task, random.Random(TEST_SEED), 1000, exclude=set())}
    return _distinct(task, random.Random(seed), num, exclude=held_out)


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
