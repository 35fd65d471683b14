"""The one way GreenCode turns text into token ids (corpora, prompts, serving, extraction).

Code is data, not a chat turn: no BOS/EOS is added, whatever the tokenizer's defaults. A
tokenizer that adds BOS by default (Llama 3) would otherwise feed served and generated prompts
a token that fine-tuning, shards and evaluation never saw. Special tokens written *in* the text
(e.g. ``<fim_prefix>``) are still recognised.
"""

from __future__ import annotations

from typing import Any


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added BOS/EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
