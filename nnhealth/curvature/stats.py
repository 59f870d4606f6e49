"""The measured curvature with how its products were taken (no torch: analyzers read it)."""

from __future__ import annotations

from dataclasses import dataclass

from nnhealth.capture.stats import CurvatureStats

EXACT = "double-backward"
FINITE = "finite-difference"


@dataclass(frozen=True)
class MeasuredCurvature(CurvatureStats):
    """CurvatureStats, and whether the bound is a certificate.

    ``hvp``: EXACT (a double backward: the Ritz residual in ``bounds`` certifies an
    eigenvalue of the Hessian within it) or FINITE (central differences of gradients:
    the residual is about the approximate operator, and ``lambda_max_error`` adds the
    products' estimated error to it; an estimate, never certified).
    """

    hvp: str = EXACT
    hvp_step: float | None = None  # the central differences' step along a unit vector
    hvp_error: float | None = None  # estimated relative error of a product (at the top)
    lambda_max_error: float | None = None  # the error bar on lambda_max

    @property
    def certified(self) -> bool:
        return self.hvp == EXACT

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "hvp": self.hvp,
            "certified": self.certified,
            "hvp_step": self.hvp_step,
            "hvp_error": self.hvp_error,
            "lambda_max_error": self.lambda_max_error,
        }
