"""Model families: one module per family, each implementing :class:`linear_decoder_jax.family.Family`.

* :mod:`linear_decoder_jax.families.drvi`: DRVI (drvi-py 0.2.x, and the scvi-tools 1.5
  ``scvi.external.DRVI`` layout written by ``drvi.utils.port_to_scvi_tools``).
"""
