"""The fixed prompt of every load test: a documented text cut to an exact number of tokens.

    prompt(n) = decode(tokenize(PROMPT_TEXT repeated)[:n]), shortened until it re-tokenizes to n tokens

It is sent as a raw `prompt` (no chat template), so the server sees exactly n prompt tokens; peers get
the same token ids.
"""

from __future__ import annotations

import logging

from matryoshka_lora.errors import ConfigError

log = logging.getLogger(__name__)

PROMPT_TEXT = (
    "The following is a report on the state of the river valley after the spring floods. "
    "Farmers along the lower banks lost most of their early planting, while the orchards on the hills "
    "came through almost untouched. The council met three times to decide how to share the grain stores, "
    "and agreed in the end to lend seed to every family that asked, to be repaid after the harvest. "
    "Engineers inspected the old stone bridge and found the pillars sound, but the road leading to it "
    "had washed away in two places. Volunteers rebuilt the road within a month. Write a short summary "
    "of the situation, then list what the valley should do before next spring. "
)


def exact_prompt(tokenizer, num_tokens: int) -> tuple[str, list[int]]:
    """(text, token ids) with len(tokenizer(text).input_ids) == num_tokens."""
    if num_tokens < 1:
        raise ConfigError("prompt_tokens", num_tokens, "an integer >= 1")
    text = PROMPT_TEXT
    while len(tokenizer(text)["input_ids"]) < num_tokens + 8:
        text += PROMPT_TEXT
    ids = list(tokenizer(text)["input_ids"])
    for cut in range(num_tokens, max(0, num_tokens - 8), -1):
        candidate = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        got = list(tokenizer(candidate)["input_ids"])
        if len(got) == num_tokens:
            return candidate, got
        if len(got) < num_tokens:  # pad with single-token words until it fits
            while len(got) < num_tokens:
                candidate += " a"
                got = list(tokenizer(candidate)["input_ids"])
            if len(got) == num_tokens:
                return candidate, got
    raise ConfigError("prompt_tokens", num_tokens, "a length this tokenizer can hit exactly (try another)")


def load_tokenizer(model: str | None):
    """The tokenizer of a local model directory (None = the embedded default model)."""
    from transformers import AutoTokenizer

    from matryoshka_lora.models import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(model))
