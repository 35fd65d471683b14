"""Request text -> prompt token ids for the served model: plain code, or its own fill-in-the-middle layout.

A request asks for fill-in-the-middle in one of two ways. It sends a ``suffix`` (Ollama,
OpenAI; Continue does when the model card's template names ``.Suffix``), or its prompt
already holds a FIM layout written with some family's sentinels (llm-vscode with FIM
enabled, Continue's templates, whatever model they were written for). Either way the prompt
is rebuilt from the text before and after the cursor with the served model's FIM tokens in
the deployment's ``fim_order`` (greencode/fim.py); a model without FIM tokens answers 400.
"""

from __future__ import annotations

from typing import Any

from greencode.config import ConfigError, FimOrder
from greencode.fim import NO_FIM, FimFormat, detect_fim, fim_prompt_ids, parse_fim_prompt
from greencode.tokens import encode
from serve_app.errors import ApiError
from serve_app.schemas import Ask

NO_FIM_CLIENT = ("the prompt is formatted for fill-in-the-middle ({family} sentinels) but this model's tokenizer has "
                 "no FIM tokens: turn FIM off in the client (llm-vscode: \"llm.fillInTheMiddle.enabled\": false; "
                 "Continue: promptTemplates.autocomplete \"{{{{{{prefix}}}}}}\"), or serve a model with FIM tokens")


class PromptBuilder:
    """The token ids of a request's prompt; FIM tokens detected once per replica."""

    def __init__(self, tokenizer: Any, fim_order: FimOrder = "psm") -> None:
        self.tokenizer, self.order = tokenizer, fim_order
        self.fim: FimFormat | None = detect_fim(tokenizer)
        if self.fim is not None and fim_order == "spm" and not self.fim.spm:
            raise ConfigError(f"fim_order: the served model's {self.fim.family} FIM format was trained "
                              "prefix-suffix-middle only: use 'psm'")

    def ids(self, ask: Ask) -> list[int]:
        """Prompt token ids; an :class:`ApiError` naming the field when the model cannot do the FIM asked for."""
        if ask.suffix:
            if self.fim is None:
                raise ApiError(f"suffix: {NO_FIM}", "suffix")
            return fim_prompt_ids(self.tokenizer, ask.prompt, ask.suffix, self.order, fmt=self.fim)
        parts = parse_fim_prompt(ask.prompt)
        if parts is None:
            return encode(self.tokenizer, ask.prompt)
        if self.fim is None:
            raise ApiError(NO_FIM_CLIENT.format(family=parts.family), "prompt")
        return fim_prompt_ids(self.tokenizer, parts.prefix, parts.suffix, self.order, parts.preamble, fmt=self.fim)
