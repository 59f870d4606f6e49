"""The preconditioned Hessian an adaptive optimizer sees: D (H + diag(wd)) D with
D = diag(sqrt(s)), s the per-coordinate step scale (P^-1: Adam's 1/(sqrt(v_hat)+eps),
times each group's lr ratio).

D (H + wd) D is symmetric and similar to P^-1 (H + wd) (P^-1 = D^2), so Lanczos on it
gives lambda_max(P^-1 H), the preconditioned sharpness whose limit for Adam is
(2+2 beta1)/((1-beta1) lr) (Cohen et al., 2022); a coupled weight decay wd adds wd to
the Hessian's diagonal, so it adds wd * s here. Each product is one of the wrapped
operator's; everything else (parameters, the symmetry test's floor, the notes) is the
wrapped operator's.
"""

from __future__ import annotations

from typing import Any

import torch


class Preconditioned:
    """``op`` seen through the diagonal step scale ``scale`` (flat float64, one entry
    per parameter coordinate) and the coupled weight decay ``decay`` (same layout, or
    None)."""

    def __init__(self, op: Any, scale: torch.Tensor, decay: torch.Tensor | None, how: str) -> None:
        if scale.shape != (op.n,):
            raise ValueError(f"preconditioner of {scale.numel()} entries for {op.n} parameters")
        self.inner = op
        self.root = scale.sqrt()
        self.shift = None if decay is None else decay * scale
        self.how = how

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # params, n, products, mode, notes, ...

    def gradient(self) -> torch.Tensor:
        """D g: the gradient in the preconditioned coordinates (Lanczos's start)."""
        return self.root * self.inner.gradient()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.root * self.inner.matvec(self.root * v)
        if self.shift is not None:
            out = out + self.shift * v
        return out

    def lift(self, v: torch.Tensor) -> torch.Tensor:
        """A vector of the preconditioned coordinates in the wrapped operator's (unit
        length, for measuring the wrapped products' error there)."""
        w = self.root * v
        norm = float(w.norm())
        return w / norm if norm > 0 else w
