"""Features of one edit step: keys and value-gradients at the edited modules (ALGORITHM.md §2).

One forward and one backward of the current model (with whatever deltas are applied to it) on the step's
prompt+target rows. At every edited module and every answer position i (and each row's subject's last token
when the batch marks it: ``TokenBatch.key_mask``, :func:`rledit.tokens.with_subject_keys`) we record

* k_i: the module's input (d_in), and
* g_i: d(sum of the answer tokens' cross-entropies)/d(module output) at that position (d_out), the *total*
  derivative through the rest of the network.

The gradient is that of the *summed* token loss, i.e. N times the gradient of the mean loss that ALGORITHM.md §2
names. With the mean, every g_i shrinks as 1/N, so an editor trained on steps of 10 edits would make half-size
updates when applied to steps of 20; with the sum, a token's gradient does not depend on how many edits share
its step. ``StepFeatures.loss`` still reports the mean.

How the gradients are obtained without touching the LM's weights: every parameter's ``requires_grad`` is
turned off for the duration, so autograd builds no graph into any weight and never creates a ``.grad`` buffer.
The first edited module to run has its output replaced by a detached copy that requires grad (a leaf: nothing
before it needs a gradient); every later edited module's output then depends on that leaf and is part of the
graph as it is. ``torch.autograd.grad(loss, outputs)`` over the kept output tensors gives each module's total
derivative, including the paths through later edited modules. Flags, hooks and train/eval modes are restored
in a ``finally`` block.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rledit.targets import EditTarget
from rledit.tokens import TokenBatch, answer_logits, model_inputs


class FeatureError(ValueError):
    """A batch or a set of targets from which features cannot be captured."""


@dataclass
class StepFeatures:
    """Keys and value-gradients of one edit step, per edited module, over the step's N answer tokens.

    Rows are answer positions in row-major (batch row, position) order, identical for every module, so
    ``keys[m][i]`` and ``grads[m][i]`` belong to the same token. Tensors are fp32 and detached (unless captured
    with ``differentiable``).
    """

    keys: dict[str, torch.Tensor]  # module name -> (N, d_in)
    grads: dict[str, torch.Tensor]  # module name -> (N, d_out)
    loss: float  # the mean answer-token cross-entropy of the batch on the current model
    n_tokens: int  # N


def answer_token_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean cross-entropy (fp32) of the answer tokens given their logits (n_answer_tokens, V), as returned
    by :func:`rledit.tokens.answer_logits`."""
    labels = batch.labels[batch.answer_mask].to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def per_row_target_nll(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean answer-token cross-entropy of each row (B,), from :func:`rledit.tokens.answer_logits` output."""
    mask = batch.answer_mask.to(logits.device)
    token_nll = F.cross_entropy(logits.float(), batch.labels.to(logits.device)[mask], reduction="none")
    row_of_token = mask.nonzero()[:, 0]
    totals = torch.zeros(mask.shape[0], device=logits.device).index_add(0, row_of_token, token_nll)
    return totals / mask.sum(1).clamp(min=1)


def capture_features(model: nn.Module, targets: Sequence[EditTarget], batch: TokenBatch,
                     differentiable: bool = False) -> StepFeatures:
    """One forward+backward of ``model`` on ``batch``; keys and value-gradients at ``targets``, at the batch's
    key positions (the answer tokens, and the subjects' last tokens where marked).

    ``differentiable``: the features keep their graph to whatever the forward depends on that requires grad
    (pending deltas with a graph: the later passes of an RL training step); the gradients then come from a
    second-order backward (``create_graph``), so the features are no longer detached.

    Runs in eval semantics (every submodule is put in eval mode, so no dropout) and restores each submodule's
    own train/eval flag afterwards. The weights never get ``.grad`` buffers and their ``requires_grad`` flags
    are left exactly as they were.
    """
    if not targets:
        raise FeatureError("no edit targets given; resolve them with rledit.targets.resolve_targets")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise FeatureError(f"duplicate target names in {names}")
    if batch.n_answer_tokens == 0:
        raise FeatureError("the batch has no answer tokens; encode it with targets (rledit.tokens.encode)")

    device = next(model.parameters()).device
    mask = batch.key_mask.to(device)
    keys: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def make_hook(target: EditTarget):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if target.name in keys:
                raise FeatureError(f"{target.name} ran twice in one forward; shared modules cannot be edited")
            inputs = args[0]
            if inputs.shape[:2] != mask.shape:
                raise FeatureError(
                    f"{target.name}: input of shape {tuple(inputs.shape)} does not line up with the batch's "
                    f"(rows, positions) = {tuple(mask.shape)}"
                )
            keys[target.name] = (inputs if differentiable else inputs.detach())[mask].float()
            if not output.requires_grad:
                output = output.detach().requires_grad_()
            outputs[target.name] = output
            return output

        return hook

    param_flags = [(p, p.requires_grad) for p in model.parameters()]
    module_modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for p, _ in param_flags:
            p.requires_grad_(False)
        model.eval()
        for target in targets:
            handles.append(target.module.register_forward_hook(make_hook(target)))
        # a second-order backward needs attention's composite ("math") kernel: the fused ones have no double backward
        kernels = sdpa_kernel(SDPBackend.MATH) if differentiable else nullcontext()
        with torch.enable_grad(), kernels:
            loss = answer_token_loss(answer_logits(model, batch), batch)
            missing = [n for n in names if n not in outputs]
            if missing:
                raise FeatureError(f"targets {missing} did not run in the forward; are they in the model?")
            summed_loss = loss * batch.n_answer_tokens  # per-token gradients: see the module docstring
            grads = torch.autograd.grad(summed_loss, [outputs[n] for n in names], allow_unused=True,
                                        create_graph=differentiable)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in module_modes:
            m.training = training
        for p, flag in param_flags:
            p.requires_grad_(flag)

    grad_rows = {}
    for name, target, grad in zip(names, targets, grads):
        if grad is None:  # the module's output does not reach the loss (e.g. a layer after the last position)
            grad_rows[name] = keys[name].new_zeros(len(keys[name]), target.d_out)
        else:
            grad_rows[name] = (grad if differentiable else grad.detach())[mask].float()
    return StepFeatures(keys=keys, grads=grad_rows, loss=float(loss.detach()), n_tokens=int(mask.sum()))


@torch.no_grad()
def capture_keys(model: nn.Module, targets: Sequence[EditTarget], batch: TokenBatch) -> dict[str, torch.Tensor]:
    """The keys alone (module name -> (N, d_in), fp32) at ``batch``'s key positions: one forward, no backward
    (the last position only reaches the output layer)."""
    mask = batch.key_mask.to(next(model.parameters()).device)
    keys: dict[str, torch.Tensor] = {}

    def make_hook(target: EditTarget):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            keys[target.name] = args[0][mask].float()
        return hook

    handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
    try:
        model(**model_inputs(model, batch), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    missing = [t.name for t in targets if t.name not in keys]
    if missing:
        raise FeatureError(f"targets {missing} did not run in the forward; are they in the model?")
    return keys


def capture_bytes(model: nn.Module, targets: Sequence[EditTarget], batch: TokenBatch) -> int:
    """A rough estimate of the memory (bytes) that :func:`capture_features` needs for ``batch``: the activations
    a forward+backward keeps per token and layer, the answer positions' logits, and the features. With the
    solve's share (:meth:`rledit.methods.base.EditMethod.step_bytes`) it came to 2.67 GiB for one step of 200
    zsRE edits on SmolLM2-135M, whose measured peak was 2.79 GiB.

    For models with a Hugging Face config (hidden size, layers, intermediate size, vocabulary); for other
    modules only the features are counted.
    """
    return capture_bytes_for(model, targets, int(batch.input_ids.numel()), batch.n_answer_tokens)


def capture_bytes_for(model: nn.Module, targets: Sequence[EditTarget], positions: int, answers: int) -> int:
    """:func:`capture_bytes` for a batch of ``positions`` tokens in all (padding included), ``answers`` of them
    answer tokens (also for a model on the meta device: :mod:`rledit.plan`)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", None) or 0
    element = next(model.parameters()).element_size()
    # weights need no gradient, so only the layers from the first edited one on keep their activations
    first = min((t.layer for t in targets if isinstance(t.layer, int)), default=0)
    kept_layers = max(1, layers - first) if layers else 0
    activations = positions * kept_layers * (16 * hidden + 6 * inner) * element
    logits = answers * vocab * 4 * 3  # logits, log-softmax and their gradient
    features = answers * sum(t.d_in + t.d_out for t in targets) * 4 * 3
    return int(activations + logits + features)
