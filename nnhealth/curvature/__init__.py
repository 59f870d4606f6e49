"""Curvature: Hessian-vector products of the scan's loss, Lanczos, Hutchinson."""
