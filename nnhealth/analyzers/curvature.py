"""NH401 curvature."""

from __future__ import annotations

from nnhealth.analyzers._fixes import Fix, FixContext, lower_lr_fix
from nnhealth.analyzers.base import Check, Option
from nnhealth.capture.stats import Capture, CurvatureStats
from nnhealth.curvature.stats import FINITE
from nnhealth.findings import Finding, Severity
from nnhealth.plan import Request


class Curvature(Check):
    """The Hessian's top eigenvalue, the learning-rate limit 2/lambda_max, and negative
    curvature.

    What it detects:
        The largest eigenvalues of the loss Hessian (mean loss over the batch, all
        trainable parameters) by Lanczos with full reorthogonalization, stopped when the
        Ritz residual (a certified bound) of each wanted eigenvalue is within ``--hessian-tol`` (default 1e-3
        relative), or when the budget of Hessian-vector products runs out (then reported
        as not converged, with the bound reached). From lambda_max it gives the step-size
        limit 2/lambda_max. With ``--lr``: an error when lr >= 2/lambda_max, a warning
        when lr is above ``warn_fraction`` of it, with a suggested rate (1/lambda_max,
        the optimal rate on the top eigendirection); without ``--lr``, an info finding
        with the limit. With ``--hessian-min``, a negative smallest eigenvalue is
        reported as info (a saddle region), relative to lambda_max. Off by default
        (``--hessian``, or ``--select NH401``, turns it on): it costs tens of products,
        each about two passes.
        Dropout is off while taking products; BatchNorm keeps the scan's mode, which
        the report states (the mode changes lambda_max tenfold on some networks).
        Nothing is certified on a wrong operator: the backward of every custom autograd
        Function on the loss's graph must itself be differentiable (not
        @once_differentiable, no torch.no_grad() or .detach() inside), and u.Hv must
        equal v.Hu on random pairs up to the products' rounding (two products more
        than Lanczos takes, counted in hvps). When the double backward cannot be had
        (an op without a second derivative, such as hardsigmoid in MobileNetV3) or
        trusted, the products are taken by central differences of gradients instead
        (two forward+backward passes each, on a float64 copy, the step calibrated on
        the first vector): the finding then gives lambda_max with an estimated error
        bar (the Ritz residual plus the products' error measured at the top Ritz
        vector), says it is not certified, and the report's curvature section says
        hvp "finite-difference", certified false. When that fails too, or user code
        fails or memory runs out while products are taken, NH401 is skipped with the
        reason and the other checks stand.

    Why it matters:
        On a quadratic with curvature lambda, gradient descent converges for
        lr < 2/lambda and diverges for lr >= 2/lambda; on a network the top Hessian
        eigenvalue is the binding constraint locally. A learning rate above the limit
        makes the loss blow up along the top eigenvector.

    Example:
        lambda_max = 12.5 gives a limit of 0.16: "lr 0.5 >= 2/lambda_max = 0.16: gradient
        descent diverges along the top eigenvector; use lr <= 0.08".

    How to fix:
        Lower the learning rate below 2/lambda_max (1/lambda_max is a safe choice) or use
        warmup; normalization (BatchNorm) and careful initialization lower lambda_max
        and allow larger rates.
    """

    code = "NH401"
    name = "curvature"
    summary = (
        "Hessian top eigenvalue(s) by Lanczos; lr vs the 2/lambda_max limit; negative curvature"
    )
    needs = frozenset({"curvature"})
    options = (
        Option("lr", None, "the learning rate, from --lr"),
        Option(
            "warn_fraction", 0.5, "above half the limit, noise or a sharper batch can tip it over"
        ),
        Option(
            "negative_ratio",
            1e-3,
            "|lambda_min| / lambda_max below this is numerical noise, not a saddle",
        ),
    )

    @classmethod
    def request(cls, options: dict) -> Request:
        return Request(curvature=True)

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        c = capture.curvature
        if c is None:
            return []
        out = [self._limit(c, options)]
        if c.lambda_min is not None and c.lambda_max > 0 and c.lambda_min < 0:
            ratio = -c.lambda_min / c.lambda_max
            if ratio >= options["negative_ratio"]:
                out.append(
                    self.finding(
                        Severity.INFO,
                        None,
                        f"negative curvature: lambda_min = {c.lambda_min:.4g}, {ratio:.2g} of "
                        "lambda_max: a saddle region (common in deep networks, not a local minimum)",
                        {
                            "lambda_min": c.lambda_min,
                            "ratio_to_lambda_max": ratio,
                            "bound": c.lambda_min_bound,
                        },
                        "no action needed; momentum and noise move SGD off saddles",
                        kind="negative",
                    )
                )
        return [f for f in out if f is not None]

    def _limit(self, c: CurvatureStats, options: dict) -> Finding | None:
        """lambda_max and the step-size limit 2/lambda_max, against ``lr`` when given."""
        lam = c.lambda_max
        limit = c.lr_limit
        status = (
            ""
            if c.converged
            else (f" (not converged in {c.lanczos_hvps} products: bound {c.bounds[0]:.2g})")
        )
        evidence = {
            "lambda_max": lam,
            "bound": c.bounds[0],
            "converged": c.converged,
            "hvps": c.hvps,
            "lr_limit": limit,
            "mode": c.mode,
        }
        if getattr(c, "hvp", None) == FINITE:  # MeasuredCurvature, finite differences
            status += (
                f" ± {c.lambda_max_error:.2g} (Hessian products by finite differences of "
                "gradients: an estimate, not certified)"
            )
            evidence |= {
                "certified": False,
                "hvp_error": c.hvp_error,
                "lambda_max_error": c.lambda_max_error,
            }
        lr = options.get("lr")
        if limit is None:
            return self.finding(
                Severity.INFO,
                None,
                f"the Hessian has no positive eigenvalue (lambda_max = {lam:.4g}){status}: "
                "no step-size limit from curvature",
                evidence,
                "no action needed from curvature",
            )
        if lr is None:
            return self.finding(
                Severity.INFO,
                None,
                f"lambda_max = {lam:.4g}{status} in {c.mode} mode: gradient descent is stable "
                f"for lr < 2/lambda_max = {limit:.4g}",
                evidence,
                f"keep the learning rate below {limit:.3g} (1/lambda_max = {limit / 2:.3g} is "
                "the optimal step on the top eigendirection); pass --lr to check yours",
            )
        if lr >= limit:
            return self.finding(
                Severity.ERROR,
                None,
                f"lr {lr:g} >= 2/lambda_max = {limit:.4g} (lambda_max = {lam:.4g}{status}, "
                f"{c.mode} mode): gradient descent diverges along the top eigenvector",
                {**evidence, "lr": lr, "lr_over_limit": lr / limit},
                f"lower the learning rate to about {limit / 2:.3g} (1/lambda_max) or below, or "
                "warm up from a small rate",
                f"for group in optimizer.param_groups:\n    group['lr'] = {limit / 2:.3g}",
            )
        if lr >= options["warn_fraction"] * limit:
            return self.finding(
                Severity.WARNING,
                None,
                f"lr {lr:g} is {lr / limit:.0%} of the stability limit 2/lambda_max = "
                f"{limit:.4g} (lambda_max = {lam:.4g}{status})",
                {**evidence, "lr": lr, "lr_over_limit": lr / limit},
                f"a rate of about {limit / 2:.3g} (1/lambda_max) leaves room for sharper batches",
            )
        return None

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {}  # the Hessian is the whole model's: the report's curvature section

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        limit = (ctx.curvature or {}).get("lr_limit")
        if not (limit and ctx.lr):
            return []  # no limit, or no rate to lower
        return [lower_lr_fix(ctx, limit / 2)]

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("lr_over_limit")

    def label(self, finding: Finding) -> str:
        return finding.message[:60]
