"""JSONL loading: completion-only labels from the chat template, and bad data -> clear error or counted skip."""

from __future__ import annotations

import json
import logging

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.training import data


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from matryoshka_lora.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "What is 2 + 2?", "completion": "4"},
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
    ],
)
def test_labels_are_the_completion_only(tokenizer, record):
    messages = data.record_messages(record, "x")
    tokenized = data.tokenize_messages(tokenizer, messages)
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenized.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    answer = [t for t in tokenized.labels if t != data.IGNORE_INDEX]
    assert tokenizer.decode(answer) == "4<|im_end|>\n"
    first = tokenized.labels.index(answer[0])
    assert all(t == data.IGNORE_INDEX for t in tokenized.labels[:first])
    assert tokenized.labels[first:] == tokenized.input_ids[first:]


@pytest.mark.parametrize(
    "lines, what_contains, given_contains",
    [
        ([], "data file", "no records"),
        (["", "   "], "data file", "no records"),
        (['{"prompt": "a", "completion": "b"}', "{not json"], ":2", "{not json"),
        (['{"prompt": "a"}'], ":1", "completion"),
        (['{"prompt": 3, "completion": "b"}'], ":1", "prompt"),
        (['{"prompt": "a", "completion": "  "}'], ":1", "empty completion"),
        (['["a", "b"]'], ":1", "list"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], ":1", "role"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'], ":1", "user"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}'], ":1", "bot"),
    ],
)
def test_bad_records_raise_with_line(tmp_path, lines, what_contains, given_contains):
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(ConfigError) as info:
        data.read_jsonl(path)
    assert what_contains in info.value.what
    assert given_contains in str(info.value.given)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        data.read_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("max_seq_len, num_kept, skipped_lines", [(1000, 3, ()), (40, 2, (3,))])
def test_too_long_records_are_skipped_and_counted(tokenizer, tmp_path, caplog, max_seq_len, num_kept, skipped_lines):
    records = [
        {"prompt": "hi", "completion": "yes"},
        {"prompt": "", "completion": "no"},
        {"prompt": "word " * 60, "completion": "x"},
    ]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in records] + [""])
    with caplog.at_level(logging.WARNING):
        kept, report = data.tokenize_records(tokenizer, data.read_jsonl(path), max_seq_len)
    assert (report.num_records, report.num_kept, report.too_long_lines) == (3, num_kept, skipped_lines)
    assert len(kept) == num_kept and all(len(r.input_ids) <= max_seq_len for r in kept)
    assert ("skipped 1 of 3" in caplog.text) == bool(skipped_lines)


def test_all_records_too_long_is_an_error(tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "word " * 60, "completion": "x"})])
    with pytest.raises(ConfigError):
        data.tokenize_records(tokenizer, data.read_jsonl(path), 16)


def test_collator_pads_right_and_masks():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = data.PadCollator(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
