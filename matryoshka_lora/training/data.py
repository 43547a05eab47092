"""Training data: JSONL records -> token ids with the loss on the completion only.

A record is either `{"prompt": str, "completion": str}` or chat `{"messages": [{"role", "content"}, ...]}`
whose last message is the assistant's answer. Both are rendered with the tokenizer's chat template:

    prompt_text = template(messages[:-1], add_generation_prompt=True)   # system/user turns + "assistant\n"
    full_text   = template(messages)                                     # ... + answer + end-of-turn
    input_ids   = tokens(prompt_text) + tokens(full_text[len(prompt_text):])
    labels      = [-100] * len(tokens(prompt_text)) + tokens(full_text[len(prompt_text):])

Bad data never crashes a run half-way: every record is checked before training starts. A malformed
record (invalid JSON, missing or non-string fields, a file with no records) raises ConfigError naming
the file and line; a record longer than `max_seq_len` tokens is skipped, counted and logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from matryoshka_lora.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TokenizedRecord:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class LoadReport:
    num_records: int
    num_kept: int
    num_too_long: int
    too_long_lines: tuple[int, ...]  # line numbers (1-based) of the skipped records, the first 20


def read_jsonl(path: str | Path) -> list[tuple[int, list[dict]]]:
    """Parse a JSONL file into (line number, messages) pairs; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("data file", str(path), "an existing JSONL file")
    out = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"JSON at {path}:{line_no}", line.strip()[:80], f"one JSON object per line ({exc.msg})"
                ) from None
            out.append((line_no, record_messages(record, f"{path}:{line_no}")))
    if not out:
        raise ConfigError(f"data file {path}", "no records", "at least one JSON record")
    return out


def record_messages(record: object, where: str) -> list[dict]:
    """Turn one record into chat messages ending with the assistant's answer; ConfigError if malformed."""
    allowed = '{"prompt": str, "completion": str} or {"messages": [{"role": str, "content": str}, ...]}'
    if not isinstance(record, dict):
        raise ConfigError(f"record at {where}", type(record).__name__, allowed)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ConfigError(f"messages at {where}", messages, "a list of >= 2 messages")
        for message in messages:
            if not (
                isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
            ):
                raise ConfigError(f"message at {where}", message, f"{{'role': one of {ROLES}, 'content': str}}")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise ConfigError(f"last message at {where}", messages[-1], "a non-empty assistant message")
        return messages
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
        missing = [k for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
        given = f"missing/non-string {missing}" if missing else "an empty completion"
        raise ConfigError(f"record at {where}", given, allowed)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def prompt_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model sees before it answers (chat template with the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("tokenizer", type(tokenizer).__name__, "a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_messages(tokenizer, messages: list[dict]) -> TokenizedRecord:
    """Token ids of a conversation and its labels: the last (assistant) message only (see module doc)."""
    prompt_text = render_prompt(tokenizer, messages[:-1])
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ConfigError(
            "chat template", "a template whose prompt is not a prefix of the chat", "a prefix-stable template"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return TokenizedRecord(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def tokenize_records(
    tokenizer, records: list[tuple[int, list[dict]]], max_seq_len: int
) -> tuple[list[TokenizedRecord], LoadReport]:
    """Tokenise every record; records longer than `max_seq_len` are skipped and counted (never truncated)."""
    kept, too_long = [], []
    for line_no, messages in records:
        tokenized = tokenize_messages(tokenizer, messages)
        if len(tokenized.input_ids) > max_seq_len:
            too_long.append(line_no)
        else:
            kept.append(tokenized)
    report = LoadReport(len(records), len(kept), len(too_long), tuple(too_long[:20]))
    if too_long:
        log.warning(
            "skipped %d of %d records longer than max_seq_len=%d tokens (lines %s%s)",
            len(too_long),
            len(records),
            max_seq_len,
            list(report.too_long_lines),
            " ..." if len(too_long) > 20 else "",
        )
    if not kept:
        raise ConfigError(
            "data", f"all {len(records)} records longer than max_seq_len={max_seq_len}", "raise --max-seq-len"
        )
    return kept, report


def records_from_examples(examples) -> list[tuple[int, list[dict]]]:
    """Built-in task examples (`tasks.Example`) as numbered prompt/completion conversations."""
    return [
        (i, [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}])
        for i, ex in enumerate(examples, start=1)
    ]


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[TokenizedRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.records[i].input_ids, "labels": self.records[i].labels}


def collate_records(tokenizer, records: list[tuple[int, list[dict]]], max_seq_len: int) -> dict[str, torch.Tensor]:
    """One padded batch (PadCollator) of numbered conversations; too-long ones skipped as in tokenize_records."""
    tokenized, _ = tokenize_records(tokenizer, records, max_seq_len)
    return PadCollator(tokenizer.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels} for r in tokenized])


@dataclass
class PadCollator:
    """Right-pad a batch: input_ids with pad_id, labels with -100, attention_mask 1 on real tokens."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
