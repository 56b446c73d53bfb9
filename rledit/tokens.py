"""Prompt + target → tensors, in exactly one place.

The conventions every part of rledit relies on:

* The target is scored as the tokens of ``" " + target`` following the prompt. They are found by
  tokenising ``prompt + " " + target`` jointly and taking what follows the prompt's own tokens (so
  SentencePiece tokenizers do not leave a stray ``"▁"``); if the prompt's tokens are not a prefix of the
  joint tokens, the target is tokenised on its own with the leading space.
* The prompt is tokenised with the tokenizer's special tokens (a BOS where the tokenizer adds one); the
  target never gets special tokens.
* Teacher forcing: the input is ``prompt + target[:-1]``. ``labels`` are *prediction-aligned*: ``labels[b, i]``
  is the token position ``i`` must predict, or -100. So ``cross_entropy(logits[b, i], labels[b, i])`` needs no
  shift, and labels must never be handed to a Hugging Face model (which would shift them again).
* Padding follows ``tokenizer.padding_side``; ``position_ids`` count only real tokens, so a left-padded row
  gives the same logits as the same row unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from rledit.chat import chat_framing
from rledit.types import EditRequest, EditRequestError, is_visible


class TokenizationError(ValueError):
    """A prompt/target pair that cannot be turned into a valid model input."""


@dataclass
class TokenBatch:
    """A padded batch of teacher-forced prompt+target rows (or prompt-only rows when no targets)."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, L) long, 0-based among real tokens
    labels: torch.Tensor  # (B, L) long, prediction-aligned target ids or -100
    target_ids: list[list[int]]  # per row, the full target token ids
    inputs_embeds: torch.Tensor | None = None  # (B, L, d) hidden states to start from instead of input_ids
    feature_mask: torch.Tensor | None = None  # (B, L) bool: where features are read (None: the answer positions)

    @property
    def answer_mask(self) -> torch.Tensor:
        """(B, L) bool: positions whose prediction is a target token."""
        return self.labels != -100

    @property
    def n_answer_tokens(self) -> int:
        """The number of answer tokens in the batch."""
        return int(self.answer_mask.sum())

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, L) bool: the positions an edit's features are read at: the answer positions, unless the batch
        names others (:func:`with_subject_keys`)."""
        return self.answer_mask if self.feature_mask is None else self.feature_mask

    @property
    def n_key_tokens(self) -> int:
        """N: the number of feature rows of the batch (positions of :attr:`key_mask`)."""
        return int(self.key_mask.sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return TokenBatch(**moved)


def select_rows(batch: TokenBatch, rows: Sequence[int]) -> TokenBatch:
    """The batch of ``rows`` alone (in the order given), cut to the columns those rows use: a few short rows of a
    padded batch cost only their own length. Positions keep their ids, so each row's logits are unchanged."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    span = used_columns(batch, rows)
    picked = {f.name: getattr(batch, f.name) for f in fields(batch)}
    for name, value in picked.items():
        if isinstance(value, torch.Tensor):
            picked[name] = value[index.to(value.device)][:, span]
    picked["target_ids"] = [batch.target_ids[i] for i in rows]
    return TokenBatch(**picked)


def used_columns(batch: TokenBatch, rows: Sequence[int]) -> slice:
    """The columns of the padded ``batch`` that ``rows`` have real tokens in (all columns if none has any): what
    :func:`select_rows` keeps."""
    if not len(rows):
        raise ValueError("select_rows needs at least one row")
    used = batch.attention_mask[torch.as_tensor(list(rows), dtype=torch.long)].bool().any(0).nonzero()[:, 0]
    return slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, batch.attention_mask.shape[1])


def text_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of user text, with the tokenizer's own framing (BOS) when ``add_special_tokens`` but never
    parsing special-token strings in the text: "<|endoftext|>" in a target is text, not the control token."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt: :func:`text_ids` with the tokenizer's framing, or, when the tokenizer was switched
    to its chat template (:func:`rledit.chat.use_chat_template`), the prompt's plain-text ids inside the
    template's user turn and assistant header."""
    framing = chat_framing(tokenizer)
    if framing is None:
        return text_ids(tokenizer, prompt)
    return framing.before + text_ids(tokenizer, prompt, add_special_tokens=False) + framing.after


def target_token_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids (:func:`prompt_ids`), ids of ``" " + target``, or of ``target`` as the start of the assistant's
    answer in chat framing) following the conventions above."""
    prompt = prompt.rstrip()
    target = target.strip()
    if not prompt:
        raise TokenizationError("empty prompt")
    if not target:
        raise TokenizationError(f"empty target for prompt {prompt!r}")
    ids = prompt_ids(tokenizer, prompt)
    if chat_framing(tokenizer) is not None:
        return ids, _visible_target(tokenizer, target, text_ids(tokenizer, target, add_special_tokens=False))
    joint = text_ids(tokenizer, prompt + " " + target)
    if joint[: len(ids)] == ids and len(joint) > len(ids):
        target_ids = joint[len(ids) :]
        eos = tokenizer.eos_token_id
        if eos is not None and target_ids[-1] == eos:
            target_ids = target_ids[:-1]  # tokenizers that append EOS to every sequence (text never makes one)
    else:
        target_ids = text_ids(tokenizer, " " + target, add_special_tokens=False)
    return ids, _visible_target(tokenizer, target, target_ids)


def _visible_target(tokenizer, target: str, target_ids: list[int]) -> list[int]:
    if not target_ids or not is_visible(tokenizer.decode(target_ids)):
        raise TokenizationError(f"target {target!r} tokenises to {tokenizer.decode(target_ids)!r}: nothing to "
                                "learn (the tokenizer normalises it away)")
    return target_ids


def encode(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str] | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
) -> TokenBatch:
    """Tokenise prompts (and targets, teacher-forced) into a padded :class:`TokenBatch`.

    ``max_length`` (e.g. the model's context size) turns an over-long row into a :class:`TokenizationError`
    naming the row; nothing is ever truncated silently. ``padding_side`` overrides the tokenizer's; results
    do not depend on it (positions count real tokens only), but ``"left"`` puts every row's answer at the
    end, which lets :func:`answer_logits` hand the output layer the last few positions only.
    """
    if isinstance(prompts, str):
        raise TokenizationError("prompts must be a sequence of strings, not one string")
    if targets is not None and len(targets) != len(prompts):
        raise TokenizationError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise TokenizationError("no prompts to encode")
    rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    all_targets: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise TokenizationError(f"row {i}: empty prompt")
        if targets is None:
            ids = prompt_ids(tokenizer, prompt.rstrip())
            rows.append(ids)
            label_rows.append([-100] * len(ids))
            all_targets.append([])
            continue
        prompt_part, target_ids = target_token_ids(tokenizer, prompt, targets[i])
        ids = prompt_part + target_ids[:-1]
        labels = [-100] * (len(prompt_part) - 1) + target_ids
        rows.append(ids)
        label_rows.append(labels)
        all_targets.append(target_ids)
    if max_length is not None:
        for i, ids in enumerate(rows):
            if len(ids) > max_length:
                raise TokenizationError(
                    f"row {i} is {len(ids)} tokens long, longer than the model's context of {max_length}"
                )
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise TokenizationError(f"padding_side must be 'left' or 'right', got {side!r}")
    return _pad(tokenizer, rows, label_rows, all_targets, left=side == "left")


def _pad(tokenizer, rows: list[list[int]], label_rows: list[list[int]], targets: list[list[int]],
         left: bool) -> TokenBatch:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise TokenizationError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    width = max(len(r) for r in rows)
    ids, mask, labels = [], [], []
    for row, lab in zip(rows, label_rows):
        n_pad = width - len(row)
        if left:
            ids.append([pad_id] * n_pad + row)
            mask.append([0] * n_pad + [1] * len(row))
            labels.append([-100] * n_pad + lab)
        else:
            ids.append(row + [pad_id] * n_pad)
            mask.append([1] * len(row) + [0] * n_pad)
            labels.append(lab + [-100] * n_pad)
    attention = torch.tensor(mask, dtype=torch.long)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=attention,
        position_ids=positions,
        labels=torch.tensor(labels, dtype=torch.long),
        target_ids=targets,
    )


def forward_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Logits (B, L, V) of ``model`` on ``batch``, with padding-aware positions."""
    return model(**model_inputs(model, batch), use_cache=False).logits


def model_inputs(model: nn.Module, batch: TokenBatch) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``model``'s forward for ``batch``, on the model's device: ``input_ids``, or
    ``inputs_embeds`` when the batch carries hidden states to start from (see :mod:`rledit.prefix`)."""
    device = next(model.parameters()).device
    inputs = {"attention_mask": batch.attention_mask.to(device), "position_ids": batch.position_ids.to(device)}
    if batch.inputs_embeds is not None:
        inputs["inputs_embeds"] = batch.inputs_embeds.to(device)
    else:
        inputs["input_ids"] = batch.input_ids.to(device)
    return inputs


def answer_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Logits (n_answer_tokens, V) at the answer positions of ``batch``, in row-major order.

    Only the answer positions go through the output layer, the largest matmul of a small LM on short rows: the
    model keeps the positions from the first answer position on (``logits_to_keep``; with a left-padded batch,
    the last max(target length) positions), and a pre-hook on the output layer hands it the answer positions
    among those as one (n_answer_tokens, d) matrix. Rows with shorter answers than the longest then cost
    nothing at the other kept positions (on 20-edit zsRE steps, 73 of 170 kept positions are answers). A model
    whose output layer is not a module reachable by ``get_output_embeddings`` projects all kept positions.
    """
    mask = batch.answer_mask
    if not mask.any():
        raise TokenizationError("the batch has no answer tokens; encode it with targets")
    first = int(mask.any(0).nonzero()[0])
    keep = mask.shape[1] - first
    kept_answers = mask[:, first:]

    def answers_only(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # (B, keep, d), a strided view of the last hidden states
        return (hidden[kept_answers.to(hidden.device)], *args[1:])  # (n_answer_tokens, d), contiguous

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    handle = head.register_forward_pre_hook(answers_only) if isinstance(head, nn.Module) else None
    try:
        out = model(**model_inputs(model, batch), use_cache=False, logits_to_keep=keep)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None:
        n_answers = int(mask.sum())
        if out.logits.shape[:-1] != (n_answers,):
            raise TokenizationError(f"the output layer of {type(model).__name__} did not give one row of logits per "
                                    f"answer token ({tuple(out.logits.shape)} for {n_answers} answer tokens)")
        return out.logits
    return out.logits[:, -keep:][kept_answers.to(out.logits.device)]


def context_length(model: nn.Module) -> int | None:
    """The model's maximum number of positions, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_subjects(requests: Sequence[EditRequest], method: str,
                   otherwise: str = "use a method that needs no subject (rledit, ultraedit, mend, ft) otherwise") -> None:
    """Raise :class:`EditRequestError` unless every request has a subject that occurs in its prompt;
    ``otherwise`` ends the message with what the user can do instead."""
    for i, request in enumerate(requests):
        if request.subject is None:
            raise EditRequestError(
                f"{method} needs the subject of every edit (the entity the fact is about, e.g. subject='Danielle "
                f"Darrieux'); edit {i} ({request.prompt!r}) has none. The bundled zsre and counterfact data "
                "provide it; " + otherwise
            )
        if request.subject.strip().lower() not in request.prompt.lower():
            raise EditRequestError(
                f"{method}: the subject {request.subject!r} of edit {i} does not occur in its prompt "
                f"{request.prompt!r}; the keys are read at the subject's last token"
            )


def subject_end(text: str, subject: str, search_from: int = 0) -> int | None:
    """Where the first occurrence of ``subject`` in ``text`` from character ``search_from`` on ends (exact case
    first, then ignoring case), or None when it does not occur."""
    start = text.find(subject, search_from)
    if start < 0:
        start = text.lower().find(subject.lower(), search_from)
    return None if start < 0 else start + len(subject)


def subject_last_token(tokenizer: Any, text: str, subject: str, search_from: int = 0) -> int:
    """Index of the subject's last token among the prompt tokens of ``text`` that :func:`rledit.tokens.encode`
    uses (:func:`rledit.tokens.prompt_ids`). The first occurrence of the subject from character
    ``search_from`` on counts (exact case first); a context prefix before the prompt is skipped so."""
    text, subject = text.rstrip(), subject.strip()
    end = subject_end(text, subject, search_from)
    if end is None:
        raise EditRequestError(f"subject {subject!r} does not occur in {text!r}")
    framing = chat_framing(tokenizer)  # chat framing: the template's tokens come first, the text has no BOS
    offset, framed = (len(framing.before), False) if framing is not None else (0, True)
    try:
        encoded = tokenizer(text, add_special_tokens=framed, return_offsets_mapping=True, split_special_tokens=True)
    except NotImplementedError:  # slow tokenizers have no offsets: count the tokens of the text up to the end
        return offset + len(text_ids(tokenizer, text[:end], add_special_tokens=framed)) - 1
    spans = encoded["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(spans) if b > a and a < end]
    if not inside:
        raise EditRequestError(f"no token of {text!r} covers the subject {subject!r}")
    return offset + inside[-1]


def subject_positions(batch: TokenBatch, token_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) in the padded ``batch`` of each row's token ``token_indices[row]`` (counted from the
    row's first real token, whatever the padding side)."""
    first_real = batch.attention_mask.argmax(dim=1)
    rows = torch.arange(len(token_indices))
    return rows, first_real + torch.tensor(list(token_indices), dtype=torch.long)


def encode_after_prefixes(tokenizer: Any, requests: Sequence[EditRequest], prefixes: Sequence[str] = ("",),
                          max_length: int | None = None) -> TokenBatch:
    """Every request's prompt after each of ``prefixes`` (``""``: the bare prompt), edit by edit, with its target
    appended, left-padded (answers last: see :func:`answer_logits`). The rows of the context-prefixed edits of
    MEMIT/AlphaEdit and of RLEdit's ``context_lengths``."""
    return encode(tokenizer, [prefix + r.prompt for r in requests for prefix in prefixes],
                  [r.target_new for r in requests for _ in prefixes], max_length=max_length, padding_side="left")


def subject_tokens(tokenizer: Any, requests: Sequence[EditRequest], prefixes: Sequence[str] = ("",)) -> list[int]:
    """The subject's last-token index of each row of :func:`encode_after_prefixes` (searched after the prefix, so
    a subject named in a prefix does not count)."""
    return [subject_last_token(tokenizer, prefix + r.prompt, r.subject, len(prefix))
            for r in requests for prefix in prefixes]


def with_subject_keys(tokenizer: Any, batch: TokenBatch, requests: Sequence[EditRequest],
                      method: str = "rledit", answers: bool = True, prefixes: Sequence[str] = ("",)) -> TokenBatch:
    """``batch`` (the requests' prompts + targets after each of ``prefixes``, as :func:`encode_after_prefixes`
    made it) with its ``feature_mask`` set to each row's subject's last token and the answer positions (the
    subjects' only, with ``answers=False``). Every request needs a subject that occurs in its prompt
    (:class:`EditRequestError` otherwise)."""
    check_subjects(requests, f"{method} with key_positions {'answer+subject' if answers else 'subject'!r}",
                   "set key_positions: answer to edit without subjects")
    rows, positions = subject_positions(batch, subject_tokens(tokenizer, requests, prefixes))
    mask = torch.zeros(batch.attention_mask.shape, dtype=torch.bool)
    mask[rows, positions] = True
    mask = mask.to(batch.attention_mask.device)
    return replace(batch, feature_mask=mask | batch.answer_mask if answers else mask)
