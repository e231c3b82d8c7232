"""``from erasus_ray.certification import CertifiedRemovalVerifier, TheoreticalBounds``: the import path the seed's
users know; the code is :mod:`erasus_ray.evaluation.certification`."""

from erasus_ray.evaluation.certification import CertificationResult, CertifiedRemovalVerifier, TheoreticalBounds

__all__ = ["CertificationResult", "CertifiedRemovalVerifier", "TheoreticalBounds"]
