"""NH401 curvature."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from nnhealth.analyzers._fixes import Fix, FixContext, lower_lr_fix
from nnhealth.analyzers.base import Check, Option
from nnhealth.capture.stats import Capture, CurvatureStats
from nnhealth.curvature.stats import FINITE
from nnhealth.findings import Finding, Severity
from nnhealth.plan import Request


class _Words:
    """How a finding names the measured matrix, its eigenvalue, the optimizer and its
    limit: the Hessian and gradient descent for SGD (2/lambda_max), the preconditioned
    Hessian P^-1 H and Adam's (2+2*beta1)/((1-beta1)*lambda_max(P^-1 H)) for Adam."""

    def __init__(self, c: CurvatureStats) -> None:
        pre = c.operator == "preconditioned"
        sgd = c.optimizer == "SGD" and not pre
        self.matrix = "preconditioned Hessian P^-1 H" if pre else "Hessian"
        self.lam = "lambda_max(P^-1 H)" if pre else "lambda_max"
        self.who = "gradient descent" if sgd else c.optimizer
        self.who_s = "the" if sgd else f"{c.optimizer}'s"
        self.how = f"; {c.preconditioner}" if pre and c.preconditioner else ""
        self.formula = _formula(c, pre)


def _formula(c: CurvatureStats, pre: bool) -> str:
    lam = "lambda_max(P^-1 H)" if pre else "lambda_max"
    if abs(c.limit_factor - 2.0) < 1e-12:
        return f"2/{lam}"
    return f"{c.limit_factor:.4g}/{lam}"


def _evidence(c: CurvatureStats, limit: float | None, factor: float) -> dict:
    return {
        "lambda_max": c.lambda_max,
        "bound": c.bounds[0],
        "converged": c.converged,
        "hvps": c.hvps,
        "lr_limit": limit,
        "limit_factor": factor,
        "mode": c.mode,
    }


@dataclass(frozen=True)
class _Sample:
    """Which examples the Hessian was taken on, as the findings say it: ``spread`` after
    lambda_max, ``where`` after another eigenvalue, both empty for the whole batch."""

    spread: str = ""
    where: str = ""
    evidence: dict = field(default_factory=dict)


def _sample(c: CurvatureStats, total: int | None) -> _Sample:
    """A sub-batch (--hessian-batch), or the mean and spread over K of them
    (--hessian-batches). The limit is judged from the mean: it estimates the sharpness a
    step on a batch of that size meets, while the max of K grows with K (the largest of
    more draws), so a verdict from it would tighten with the number of sub-batches
    measured; the spread is reported beside it for the sharper batches."""
    n = c.examples
    if c.batches <= 1:
        if n is None or total is None or n >= total:
            return _Sample()
        where = f" on the first {n} of {total} examples"
        return _Sample(where, where, {"examples": n, "batches": 1})
    each = c.batch_lambda_max
    std, lo, hi = statistics.stdev(each), min(each), max(each)
    return _Sample(
        f" ± {std:.2g} over {c.batches} sub-batches of {n} examples (min {lo:.4g}, max {hi:.4g})",
        f" (mean over {c.batches} sub-batches of {n} examples)",
        {
            "examples": n,
            "batches": c.batches,
            "lambda_max_std": std,
            "lambda_max_min": lo,
            "lambda_max_max": hi,
        },
    )


def _suggested(c: CurvatureStats) -> float:
    return c.suggest_factor / c.lambda_max


def _why_suggested(c: CurvatureStats) -> str:
    if c.operator == "preconditioned" and c.optimizer in ("Adam", "AdamW"):
        return "(half the limit)"
    if abs(c.suggest_factor - 1.0) < 1e-12:
        return "(1/lambda_max, the optimal step on the top eigendirection)"
    return "((1-beta)/lambda_max: an effective step lr/(1-beta) of 1/lambda_max)"


class Curvature(Check):
    """The Hessian's top eigenvalue, the optimizer's learning-rate limit, and negative
    curvature.

    What it detects:
        The largest eigenvalues of the loss Hessian (mean loss over the batch, all
        trainable parameters) by Lanczos with full reorthogonalization, stopped when the
        Ritz residual (a certified bound) of each wanted eigenvalue is within ``--hessian-tol`` (default 1e-2
        relative), or when the budget of Hessian-vector products runs out (then reported
        as not converged, with the bound reached). From lambda_max it gives the step-size
        limit of the scan's optimizer (``--optimizer``, else the one saved with the
        model, else SGD), on the quadratic model lr < c / lambda_max:
          SGD                      c = 2
          SGD, momentum beta       c = (2+2 beta)/(1-dampening)   (3.8 at 0.9)
          Nesterov, beta           c = (2+2 beta)/(1+2 beta)      (1.36 at 0.9)
          RMSprop                  c = 2+2 beta (its momentum; 2 without)
          Adam, AdamW              c = (2+2 beta1)/(1-beta1)      (38 at 0.9)
        (momentum: the roots of the heavy-ball iteration x' = x - lr(beta v + g) leave
        the unit disc at lr*lambda = 2+2beta; Nesterov's at (2+2beta)/(1+2beta); Adam:
        Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", 2022). LARS
        and LAMB rescale each layer's step at every step, so no fixed curvature limit
        applies: lambda_max is reported as info and NH301's relative update is the
        verdict. For Adam, AdamW and RMSprop lambda is that of the preconditioned Hessian
        P^-1 H, P = diag(sqrt(v_hat)+eps) (Adam, with v from the saved exp_avg_sq and
        this batch's gradient), measured by Lanczos on the symmetric D H D, D = P^-1/2;
        a coupled weight decay adds wd to H. With no saved state P is that of Adam's
        first step, v_hat = g^2 of this batch: reported as info only, never a verdict,
        since one batch's g^2 understates the v_hat Adam builds up (on stock models
        trained at lr 1e-3, 38/lambda from it is 1.8e-6 for ResNet-18, 7.7e-5 for a small
        ViT, 5e-4 for a small GPT-2); the info gives 2/lambda, the bound of the first
        steps (m_hat = g, no momentum yet), the case for warmup. With an lr (``--lr`` or
        the saved one): an error when lr >= the limit, a warning when lr is above
        ``warn_fraction`` of it, with a suggested rate: 1/lambda_max for SGD (the optimal
        rate on the top eigendirection); (1-beta)/lambda_max with momentum (the same
        effective step lr/(1-beta); half the limit, 1.9/lambda_max at 0.9, still
        diverged on a tanh MLP); half the limit for Adam. Without an lr, an info finding
        with the limit. With ``--hessian-min``, a negative smallest eigenvalue is
        reported as info (a saddle region), relative to lambda_max. Off by default
        (``--hessian``, or ``--select NH401``, turns it on): it costs tens of products,
        each about two passes.
        Dropout is off while taking products; BatchNorm keeps the scan's mode, which
        the report states (the mode changes lambda_max tenfold on some networks).
        ``--hessian-batch N`` takes the Hessian of the loss on the batch's first N
        examples (the sharpness of a step on a batch of N; in train mode BatchNorm
        normalizes by those N examples' statistics). ``--hessian-batches K`` runs
        Lanczos on K disjoint sub-batches of N examples (N = batch // K unless given):
        each eigenvalue, bound and the trace are the mean over the sub-batches (the
        mean of the bounds still certifies the mean), the finding gives lambda_max's
        sample std, min and max, and the limit is judged from the mean (the max of K
        grows with K, so a verdict from it would depend on how many were measured;
        warn_fraction leaves the room for sharper batches). Single-batch estimates vary
        from batch to batch; the spread says by how much.
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
        "Hessian top eigenvalue(s) by Lanczos; lr vs the optimizer's limit (SGD 2/lambda_max, "
        "Adam 38/lambda_max(P^-1 H)); negative curvature"
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
        opt = capture.optimizer or {}
        sample = _sample(c, capture.examples)
        first_step = c.operator == "preconditioned" and opt.get("adaptive") and not opt["state"]
        if opt.get("layerwise"):
            out = [self._layerwise(c, opt, sample, options)]
        elif first_step:
            out = [self._first_step(c, sample, options)]
        else:
            out = [self._limit(c, sample, options)]
        if c.lambda_min is not None and c.lambda_max > 0 and c.lambda_min < 0:
            ratio = -c.lambda_min / c.lambda_max
            if ratio >= options["negative_ratio"]:
                out.append(
                    self.finding(
                        Severity.INFO,
                        None,
                        f"negative curvature: lambda_min = {c.lambda_min:.4g}{sample.where}, "
                        f"{ratio:.2g} of lambda_max: a saddle region (common in deep networks, "
                        "not a local minimum)",
                        {
                            "lambda_min": c.lambda_min,
                            "ratio_to_lambda_max": ratio,
                            "bound": c.lambda_min_bound,
                            **sample.evidence,
                        },
                        "no action needed; momentum and noise move SGD off saddles",
                        kind="negative",
                    )
                )
        return [f for f in out if f is not None]

    def _limit(self, c: CurvatureStats, sample: _Sample, options: dict) -> Finding | None:
        """lambda_max (of P^-1 H for an adaptive optimizer) and the optimizer's step-size
        limit, against ``lr`` when given."""
        lam = c.lambda_max
        limit = c.lr_limit
        status = sample.spread + (
            ""
            if c.converged
            else (f" (not converged in {c.lanczos_hvps} products: bound {c.bounds[0]:.2g})")
        )
        evidence = _evidence(c, limit, c.limit_factor) | sample.evidence
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
        words = _Words(c)
        lr = options.get("lr")
        if limit is None:
            return self.finding(
                Severity.INFO,
                None,
                f"the {words.matrix} has no positive eigenvalue ({words.lam} = {lam:.4g})"
                f"{status}: no step-size limit from curvature",
                evidence,
                "no action needed from curvature",
            )
        if lr is None:
            return self.finding(
                Severity.INFO,
                None,
                f"{words.lam} = {lam:.4g}{status} in {c.mode} mode{words.how}: {words.who} is "
                f"stable for lr < {words.formula} = {limit:.4g}",
                evidence,
                f"keep the learning rate below {limit:.3g}; about {_suggested(c):.3g} "
                f"{_why_suggested(c)} leaves room for sharper batches; pass --lr to check yours",
            )
        if lr >= limit:
            return self.finding(
                Severity.ERROR,
                None,
                f"lr {lr:g} >= {words.formula} = {limit:.4g} ({words.lam} = {lam:.4g}{status}, "
                f"{c.mode} mode{words.how}): {words.who} diverges along the top eigenvector",
                {**evidence, "lr": lr, "lr_over_limit": lr / limit},
                f"lower the learning rate to about {_suggested(c):.3g} {_why_suggested(c)} or "
                "below, or warm up from a small rate",
                f"for group in optimizer.param_groups:\n    group['lr'] = {_suggested(c):.3g}",
            )
        if lr >= options["warn_fraction"] * limit:
            return self.finding(
                Severity.WARNING,
                None,
                f"lr {lr:g} is {lr / limit:.0%} of {words.who_s} stability limit "
                f"{words.formula} = {limit:.4g} ({words.lam} = {lam:.4g}{status})",
                {**evidence, "lr": lr, "lr_over_limit": lr / limit},
                f"a rate of about {_suggested(c):.3g} {_why_suggested(c)} leaves room for "
                "sharper batches",
            )
        return None

    def _first_step(self, c: CurvatureStats, sample: _Sample, options: dict) -> Finding:
        """An adaptive optimizer with no saved state: P from this batch's gradient alone
        (Adam's first step, v_hat = g^2). Info, never a verdict: one batch's g^2 is far
        below the v Adam accumulates (the noise of later batches adds to it), so the
        limit is pessimistic by orders of magnitude on stock models (ResNet-18 1.8e-6,
        ViT 7.7e-5, GPT-2 5e-4, all trained at 1e-3); it measures how far the first
        steps overshoot before v_hat settles, the case for warmup."""
        lam, lr = c.lambda_max, options.get("lr")
        # bias correction makes the first updates m_hat = g: no momentum yet, so the
        # first steps are those of preconditioned gradient descent, stable below 2/lambda
        limit = 2.0 / lam if lam > 0 else None
        words = _Words(c)
        evidence = {**_evidence(c, limit, 2.0), "first_step": True, **sample.evidence}
        over = ""
        if lr is not None and limit is not None:
            evidence |= {"lr": lr, "lr_over_limit": lr / limit}
            over = f"; lr {lr:g} is {lr / limit:.3g}x that"
        bound = (
            "no step-size limit"
            if limit is None
            else f"its first steps (m_hat = g: no momentum yet) are stable for lr < 2/{words.lam}"
            f" = {limit:.4g}"
        )
        return self.finding(
            Severity.INFO,
            None,
            f"{words.lam} = {lam:.4g}{sample.spread} at {c.optimizer}'s first step (no saved "
            f"optimizer state: {c.preconditioner}), {c.mode} mode: {bound}{over}. One batch's g^2 "
            f"understates the v_hat {c.optimizer} builds up, so the later limit "
            f"{words.formula} cannot be judged from it",
            evidence,
            "for a verdict, scan a checkpoint that holds the optimizer state (or pass "
            "--optimizer-state); meanwhile warm the rate up from about this limit over the "
            "first few hundred steps (the early v_hat rests on few gradients: Liu et al., "
            "RAdam, 2020)",
            kind="first-step",
        )

    def _layerwise(self, c: CurvatureStats, opt: dict, sample: _Sample, options: dict) -> Finding:
        """LARS and LAMB rescale each layer's step at every step (to lr * eta * ||w||, or
        lr * ||w||): a fixed curvature limit predicts neither (tests/
        test_optimizer_limits.py: LAMB's loss rises at half a frozen-trust limit, LARS
        overshoots and recovers at 1.5x). Info: lambda_max, and where the verdict is."""
        lam, lr = c.lambda_max, options.get("lr")
        name = opt.get("name", c.optimizer)
        evidence = {"lambda_max": lam, "bound": c.bounds[0], "hvps": c.hvps, "mode": c.mode}
        evidence |= sample.evidence
        step = "lr * eta * ||w||" if opt.get("kind") == "lars" else "lr * ||w||"
        tail = (
            f"; each layer moves by about {step} per step whatever the curvature: NH301's "
            "relative update is the lr's verdict"
        )
        if lr is not None:
            evidence["lr"] = lr
        return self.finding(
            Severity.INFO,
            None,
            f"lambda_max = {lam:.4g}{sample.spread} in {c.mode} mode; {name} rescales each layer's step by "
            f"its trust ratio at every step, so no fixed curvature limit applies{tail}",
            evidence,
            "no action from curvature; keep each layer's relative step (NH301) near 1e-3",
            kind="layer-wise",
        )

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {}  # the Hessian is the whole model's: the report's curvature section

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        curvature = ctx.curvature or {}
        rate = curvature.get("suggested_lr")
        if rate is None and curvature.get("lr_limit"):
            rate = curvature["lr_limit"] / 2
        if not (rate and ctx.lr) or finding.evidence.get("first_step"):
            return []  # no limit, no rate to lower, or no verdict
        return [lower_lr_fix(ctx, rate)]

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("lr_over_limit")

    def label(self, finding: Finding) -> str:
        return finding.message[:60]
