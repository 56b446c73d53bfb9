"""The ridge solve of the hypernetwork family (ALGORITHM.md §4, §4b), and its fast form at edit time.

* :func:`value_shifts` turns the network's outputs into the value shifts D of a step.
* :func:`ridge_factors` solves for the factored update ΔW = U V of one module: the plain solve (an N×N system),
  or the memory-aware one with the penalty A = e^λ I + β C_mem + α C_0 (a d_in × d_in system), differentiable
  in D and the scalars, which is what the RL trainer backpropagates through.
* :class:`PenaltyInverses` keeps A⁻¹ per module at edit time, when no gradient is needed: built once for the
  module's scalars, then brought up to date by a rank-N Woodbury update when a step's keys join the memory. A
  step then costs O(d_in² N) per module and pass instead of a fresh O(d_in³) factorisation per pass, which is
  what keeps the memory-aware solve fast for wide modules (d_in = 4,096 or 14,336 in 7-9B models; measured by
  ``benchmarks/solve_cost.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rledit.methods.base import UpdateError


def value_shifts(keys: torch.Tensor, edited_keys: torch.Tensor, edited_grads: torch.Tensor,
                 lr: torch.Tensor) -> torch.Tensor:
    """D (N, d_out) with rows d_i = -lr · <k_i, k~_i> · g~_i."""
    return -lr * (keys * edited_keys).sum(-1, keepdim=True) * edited_grads


def ridge_factors(keys: torch.Tensor, shifts: torch.Tensor, ridge_log: torch.Tensor,
                  penalty: torch.Tensor | None = None,
                  inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U, V) of ΔW = argmin ||K ΔW - D||² + e^λ ||ΔW||² + tr(ΔWᵀ P ΔW), the one ridge solve of the
    hypernetwork family (ALGORITHM.md §4, §4b).

    ``keys`` K (N, d_in), ``shifts`` D (N, d_out), ``ridge_log`` λ (scalar tensor), ``penalty`` P (d_in × d_in,
    symmetric positive semi-definite, e.g. β·C_mem + α·C_0) or None. Returns fp32 tensors; differentiable in
    D, λ and P.

    * Without ``penalty``: U = Kᵀ, V = (K Kᵀ + e^λ I_N)⁻¹ D, an N×N system (push-through identity).
    * With it, A = e^λ I + P: U = A⁻¹ Kᵀ (d_in × N, by a Cholesky solve of the d_in × d_in system) and
      V = (K U + I_N)⁻¹ D (Woodbury), so ΔW = U V = (KᵀK + A)⁻¹ Kᵀ D keeps rank ≤ N. Cost O(d_in³ + d_in² N)
      per module and step: milliseconds at d_in = 576 or 1536.
    * ``inverse``, A⁻¹ itself (fp64, from :class:`PenaltyInverses`), replaces ``ridge_log`` and ``penalty``:
      U = A⁻¹ Kᵀ is then one product, O(d_in² N). Not differentiable in the scalars (edit time only).
    """
    keys64 = keys.to(torch.float64)
    n, d_in = keys.shape
    eye_n = torch.eye(n, dtype=torch.float64, device=keys.device)
    try:
        if inverse is not None:
            left = inverse @ keys64.T
        elif penalty is None:
            system = keys64 @ keys64.T + ridge_log.to(torch.float64).exp() * eye_n
            return keys.T.to(torch.float32), torch.linalg.solve(system, shifts.to(torch.float64)).to(torch.float32)
        else:
            system = ridge_system(penalty, ridge_log, d_in, keys.device)
            left = torch.cholesky_solve(keys64.T, torch.linalg.cholesky(system))
        inner = keys64 @ left + eye_n
        return left.to(torch.float32), torch.linalg.solve(inner, shifts.to(torch.float64)).to(torch.float32)
    except torch.linalg.LinAlgError as error:
        raise UpdateError(f"the ridge system is singular or not positive definite (λ = {float(ridge_log):.3g}): "
                          f"{error}")


def ridge_system(penalty: torch.Tensor | None, ridge_log: torch.Tensor, d_in: int,
                 device: torch.device | str) -> torch.Tensor:
    """A = e^λ I + P (fp64, d_in × d_in; P = None counts as 0), differentiable in λ and P."""
    ridge = ridge_log.to(torch.float64).exp() * torch.eye(d_in, dtype=torch.float64, device=device)
    return ridge if penalty is None else penalty.to(torch.float64) + ridge


def leading_part(moment: torch.Tensor, rank: int | None) -> torch.Tensor:
    """The symmetric PSD ``moment`` keeping only its ``rank`` largest eigen-directions, Σ_{i≤rank} μ_i v_i v_iᵀ
    (``moment`` itself when ``rank`` is None or not below its size)."""
    if rank is None or rank >= moment.shape[0]:
        return moment
    values, vectors = torch.linalg.eigh(moment.to(torch.float64))
    top_values, top_vectors = values[-rank:].clamp(min=0), vectors[:, -rank:]
    part = (top_vectors * top_values) @ top_vectors.T
    return ((part + part.T) / 2).to(moment.dtype)


def factored_frobenius_sq(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||U V||²_F without forming U V: sum((UᵀU) ⊙ (V Vᵀ)), O(r²(d_in + d_out)). Differentiable."""
    return ((u.T @ u) * (v @ v.T)).sum()


def inverse_with_keys(inverse: torch.Tensor, keys: torch.Tensor, weight: float) -> torch.Tensor:
    """(A + w KᵀK)⁻¹ from A⁻¹ (fp64, d_in × d_in) and keys K (N, d_in), by Woodbury:
    A⁻¹ - A⁻¹Kᵀ (I/w + K A⁻¹ Kᵀ)⁻¹ K A⁻¹, O(d_in² N); symmetrised."""
    keys64 = keys.to(inverse.device, torch.float64)
    left = inverse @ keys64.T
    inner = keys64 @ left + torch.eye(len(keys64), dtype=torch.float64, device=inverse.device) / weight
    updated = inverse - left @ torch.linalg.solve(inner, left.T)
    return (updated + updated.T) / 2


Scalars = tuple[float, float, float]  # (λ, β, α) of one module, the values A⁻¹ was built for


class PenaltyInverses:
    """A⁻¹ = (e^λ I + β C_mem + α C_0)⁻¹ per module, kept up to date at edit time (see the module docstring).

    An entry is valid for the scalars it was built with and the memory as it was then plus every step
    :meth:`add_keys` was told about. Anything else that changes the memory (a revert, a reset, a loaded state)
    must :meth:`clear` the entries; scalars that changed (training) are noticed by :meth:`get`, which rebuilds.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Scalars, torch.Tensor]] = {}

    def get(self, name: str, scalars: Scalars, system: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A⁻¹ of module ``name`` for ``scalars``; ``system()`` gives A (fp64) when it has to be built."""
        entry = self.entries.get(name)
        if entry is None or entry[0] != scalars:
            try:
                inverse = torch.cholesky_inverse(torch.linalg.cholesky(system()))
            except torch.linalg.LinAlgError as error:
                raise UpdateError(f"{name}: the ridge system is not positive definite (λ, β, α = {scalars}): "
                                  f"{error}")
            entry = self.entries[name] = (scalars, inverse)
        return entry[1]

    def add_keys(self, name: str, scalars: Scalars, keys: torch.Tensor) -> None:
        """The memory of module ``name`` gained ``keys`` (N, d_in), so A grew by β KᵀK: by Woodbury,
        A⁻¹ ← A⁻¹ - A⁻¹Kᵀ (I/β + K A⁻¹ Kᵀ)⁻¹ K A⁻¹, O(d_in² N). An entry for other scalars is dropped."""
        entry = self.entries.pop(name, None)
        beta = scalars[1]
        if entry is None or entry[0] != scalars or beta <= 0:
            return
        self.entries[name] = (scalars, inverse_with_keys(entry[1], keys, beta))

    def clear(self) -> None:
        """Drop every entry (the memory changed in a way :meth:`add_keys` does not follow)."""
        self.entries = {}

    def nbytes(self) -> int:
        """Bytes held by the kept inverses."""
        return sum(inverse.numel() * inverse.element_size() for _, inverse in self.entries.values())
