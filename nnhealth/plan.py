"""What the pass must produce: each selected check's capture request, merged.

A check states what it needs beyond its ``needs`` (``Check.request(options)``): the
saturation bounds to count against, per-unit fingerprints, the tolerance that groups
duplicate weight rows, whether the Hessian is measured. The runner merges the selected
checks' requests into one ``Plan`` and runs the pass it describes; no module outside
``analyzers/`` names a check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One check's needs from the pass, beyond weights/activations/gradients."""

    # count nonlinearity outputs whose derivative is below this fraction of its peak
    saturation_derivative: float | None = None
    # per-unit fingerprints of each nonlinearity's outputs over the batch
    fingerprints: bool = False
    # group weight rows equal within this relative tolerance (duplicate units)
    symmetry_rtol: float | None = None
    # the Hessian's extreme eigenvalues (and trace), by Lanczos
    curvature: bool = False
