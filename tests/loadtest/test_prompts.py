"""prompts: the fixed prompt re-tokenizes to exactly the asked number of tokens."""

from __future__ import annotations

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.prompts import PROMPT_TEXT, exact_prompt, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("num_tokens", [1, 2, 17, 128, 300])
def test_exact_token_count(tokenizer, num_tokens):
    text, ids = exact_prompt(tokenizer, num_tokens)
    assert len(ids) == num_tokens
    assert list(tokenizer(text)["input_ids"]) == ids
    assert PROMPT_TEXT.startswith(text[:20])


def test_zero_tokens_refused(tokenizer):
    with pytest.raises(ConfigError):
        exact_prompt(tokenizer, 0)
