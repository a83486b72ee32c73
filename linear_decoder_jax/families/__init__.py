"""Model families: one module per family, each implementing :class:`linear_decoder_jax.family.Family`.

* :mod:`linear_decoder_jax.families.linear_scvi`: LinearSCVI (scvi-tools' LDVAE).
* :mod:`linear_decoder_jax.families.drvi`: DRVI (drvi-py 0.2.x, and the scvi-tools 1.5
  ``scvi.external.DRVI`` layout written by ``drvi.utils.port_to_scvi_tools``).
"""

from __future__ import annotations

from typing import Any


def of(spec: Any) -> Any:
    """The family of a ``config.ModelSpec`` (its ``family`` names it)."""
    if spec.family == "drvi":
        from linear_decoder_jax.families.drvi import DRVI

        return DRVI(spec.model)
    from linear_decoder_jax.families.linear_scvi import LinearSCVIFamily

    return LinearSCVIFamily(spec.model)
