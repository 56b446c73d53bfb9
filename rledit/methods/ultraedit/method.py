"""UltraEdit-style closed form (ALGORITHM.md §7): no learned network, lifelong-normalised features, one ridge
solve per module and step.

For an edited module with step features (keys k_i ∈ R^{d_in}, value-gradients g_i ∈ R^{d_out}, i over the
step's N answer tokens):

1. lifelong normalisation: the module's running mean/std of z_i = [k_i ; g_i] is first updated with this
   step's rows, then every row is normalised with it: [k̂_i ; ĝ_i] = (z_i - mean) / std. The statistics keep
   accumulating over the whole lifelong run (they are the method's only state, saved with the editor);
2. value shifts: d_i = -η · ||k̂_i||² · ĝ_i — the normalised value-gradient, weighted by how large the token's
   normalised key is;
3. ridge regression of the shifts on the RAW keys: ΔW = argmin ||K ΔW - D||² + λ ||ΔW||², computed in the
   factored form ΔW = Kᵀ (K Kᵀ + λ I_N)⁻¹ D of :func:`rledit.methods.rledit.ridge_factors` (an N×N solve).

Unlike the untrained RLEdit editor (whose network output is de-normalised back to the features' scale), the
shifts here stay in normalised units: the running statistics set the update's scale, which is what keeps it
bounded over long runs. With a single answer token in the very first step ĝ is 0 (a row normalised by its own
statistics), so that step changes nothing; batches of several tokens do not have this problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rledit.methods.base import EditMethod, StepFeaturesLike, UpdateError, check_updates, register_method
from rledit.methods.rledit.method import _check_features
from rledit.methods.rledit.net import RunningNormalizer
from rledit.methods.rledit.solve import ridge_factors, value_shifts
from rledit.methods.ultraedit.config import UltraEditHparams
from rledit.targets import EditTarget


@register_method("ultraedit")
class UltraEditMethod(EditMethod):
    """Training-free editor: lifelong feature normalisation, value shifts and one ridge solve per module."""

    name = "ultraedit"
    hparams_class = UltraEditHparams

    def __init__(self, hparams: UltraEditHparams | None = None):
        self.hparams = hparams if hparams is not None else UltraEditHparams()
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.normalizers = nn.ModuleList()  # one per edited module, in target order

    def prepare(self, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget]) -> None:
        """Create a fresh running normaliser of size d_in + d_out per edited module, on the model's device."""
        self.module_shapes = {t.name: t.shape for t in targets}
        device = next(model.parameters()).device
        self.normalizers = nn.ModuleList(RunningNormalizer(t.d_in + t.d_out) for t in targets).to(device)

    def normalizer(self, name: str) -> RunningNormalizer:
        """The running normaliser of module ``name``."""
        if name not in self.module_shapes:
            raise UpdateError(f"{name!r} is not edited by this editor; edited modules: {list(self.module_shapes)}")
        return self.normalizers[list(self.module_shapes).index(name)]

    def compute_updates(self, features: StepFeaturesLike,
                        targets: Sequence[EditTarget] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors (U, V) = (Kᵀ, (K Kᵀ + λ I)⁻¹ D) per module. On an error the normalisers are left as they were."""
        if not self.module_shapes:
            raise UpdateError(f"{self.name}: call prepare(model, tokenizer, targets) first")
        _check_features(features, self.module_shapes)
        hp = self.hparams
        saved = self.state_dict()
        try:
            updates = {}
            for name, raw_keys in features.keys.items():
                normalizer = self.normalizer(name)
                keys = raw_keys.to(device=normalizer.mean.device, dtype=torch.float32)
                grads = features.grads[name].to(device=keys.device, dtype=torch.float32)
                if hp.normalizer == "lifelong":
                    normalizer.update(torch.cat([keys, grads], dim=-1))
                    normalized_keys, normalized_grads = normalizer.normalize(
                        torch.cat([keys, grads], dim=-1)).split([keys.shape[1], grads.shape[1]], dim=-1)
                else:
                    normalized_keys, normalized_grads = keys, grads
                lr = torch.tensor(hp.lr, device=keys.device)
                shifts = value_shifts(normalized_keys, normalized_keys, normalized_grads, lr)
                updates[name] = ridge_factors(keys, shifts, torch.tensor(math.log(hp.ridge), device=keys.device))
            check_updates(updates, self.module_shapes)
        except UpdateError:
            self.load_state_dict(saved)
            raise
        return updates

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running statistics (count, mean, m2) of every module's normaliser, by target index."""
        return {k: v.detach().clone() for k, v in self.normalizers.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore normaliser statistics saved by :meth:`state_dict` (after :meth:`prepare`)."""
        own = self.normalizers.state_dict()
        wrong = sorted(k for k in own.keys() | state.keys()
                       if k not in own or k not in state or own[k].shape != state[k].shape)
        if wrong:
            raise UpdateError(
                f"the saved {self.name} state does not fit the edited modules {self.module_shapes}: missing, "
                f"extra or differently shaped tensors {wrong[:8]}; was it saved for another model or module set?"
            )
        self.normalizers.load_state_dict(dict(state))
