"""Prompting an instruction-tuned model through its chat template (off by default).

The published editing protocols prompt models with raw text ("The mother tongue of X is"); an instruction-tuned
model such as SmolLM2-135M-Instruct answers raw prompts poorly (its unedited greedy continuations are mostly
empty). :func:`use_chat_template` switches a tokenizer to chat framing for everything rledit encodes as a
*prompt* (edit prompts, rephrases, locality prompts, generation): each prompt becomes one user turn followed by
the assistant header, and the target is the start of the assistant's answer (no leading space).

The framing is token-level: the template is rendered once around a placeholder, its text before and after the
placeholder is tokenised with the template's special tokens (``<|im_start|>``) parsed, and the user's prompt
in between is tokenised as plain text (:func:`rledit.tokens.text_ids`), so a prompt that contains
"<|im_end|>" stays text, exactly as without the template. Targets and corpus texts are never framed.

The mode belongs to the tokenizer object (a weak registry, nothing is written into the tokenizer), so every
editor, evaluator and generator using that tokenizer sees the same prompts; :func:`chat_framing` says whether
it is on.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

PLACEHOLDER = "\u2063rledit-prompt\u2063"  # invisible separators around a word no template contains


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template does not put the user's text in one place."""


@dataclass(frozen=True)
class ChatFraming:
    """Token ids before and after the user's prompt (the template's own tokens, special ones parsed)."""

    before: list[int]
    after: list[int]


_FRAMINGS: weakref.WeakKeyDictionary[Any, ChatFraming] = weakref.WeakKeyDictionary()


def use_chat_template(tokenizer: Any, enabled: bool = True) -> ChatFraming | None:
    """Frame every prompt ``tokenizer`` encodes for rledit in its chat template (``enabled=False``: raw prompts
    again). Raises :class:`ChatTemplateError`, changing nothing, when the tokenizer has no usable template."""
    if not enabled:
        _FRAMINGS.pop(tokenizer, None)
        return None
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                                "prompt it without one (the published protocols do)")
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False,
                                                 add_generation_prompt=True)
    except Exception as error:  # a template may raise anything (jinja errors, its own exceptions)
        raise ChatTemplateError(f"the tokenizer's chat template cannot render one user turn: {error}") from error
    before, found, after = rendered.partition(PLACEHOLDER)
    if not found or PLACEHOLDER in after:
        raise ChatTemplateError("the tokenizer's chat template does not put the user's message in one place")
    framing = ChatFraming(_template_ids(tokenizer, before), _template_ids(tokenizer, after))
    _FRAMINGS[tokenizer] = framing
    return framing


def chat_framing(tokenizer: Any) -> ChatFraming | None:
    """The framing :func:`use_chat_template` set on ``tokenizer``, or None (raw prompts)."""
    try:
        return _FRAMINGS.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced was never framed
        return None


def restore_chat_framing(tokenizer: Any, framing: ChatFraming | None) -> None:
    """Put back a mode read earlier with :func:`chat_framing` (None: raw prompts)."""
    if framing is None:
        _FRAMINGS.pop(tokenizer, None)
    else:
        _FRAMINGS[tokenizer] = framing


@contextmanager
def raw_prompts(tokenizer: Any) -> Iterator[None]:
    """Inside the block ``tokenizer``'s prompts are raw text whatever its mode (for probes defined on raw text,
    such as perplexity); the mode is restored on exit."""
    framing = chat_framing(tokenizer)
    restore_chat_framing(tokenizer, None)
    try:
        yield
    finally:
        restore_chat_framing(tokenizer, framing)


def _template_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
