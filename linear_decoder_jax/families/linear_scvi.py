"""LinearSCVI (scvi-tools' LDVAE) as a model family: the pure functions of ``model.py`` behind
the ``family.Family`` protocol, plus the affine decoder that the scorers' fast paths use
(``family.AffineFamily``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax

from linear_decoder_jax import model
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.distributions import Likelihood, log_prob
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.family import AffineDecoder, Encoded, LibraryChoice, Rates
from linear_decoder_jax.params import LDVAEParams
from linear_decoder_jax.schema import latent_names

Array = jax.Array


@dataclass(frozen=True)
class LinearSCVIFamily:
    """LinearSCVI: encoder MLP, linear decoder + BatchNorm + softmax, one latent per split."""

    name: ClassVar[str] = "linear_scvi"
    config: LDVAEConfig

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def n_vars(self) -> int:
        return self.config.n_input

    @property
    def simplex(self) -> bool:
        return self.config.latent_distribution == "ln"

    @property
    def additive(self) -> bool:
        return False

    @property
    def likelihood(self) -> Likelihood:
        return self.config.gene_likelihood

    def latent_names(self) -> list[str]:
        return latent_names(self.config.n_latent)

    def unit_latents(self) -> tuple[tuple[int, ...], ...]:
        return tuple((k,) for k in range(self.config.n_latent))

    def split_names(self) -> list[str]:
        return self.latent_names()

    def encode(
        self,
        params: LDVAEParams,
        x: Array,
        batch: Array,
        label: Array,
        *,
        library: LibraryChoice = "model",
    ) -> Encoded:
        del batch, label  # LDVAE's encoders see no covariates
        post = model.inference(params, x, config=self.config)
        z = model.z_transformation(post.qz_m, config=self.config)
        log_library = model.library(post, x, config=self.config, choice=library)
        return Encoded(post.qz_m, post.qz_v, z, log_library)

    def decoder_input(self, z: Array) -> Array:
        return model.z_transformation(z, config=self.config)

    def decode(
        self,
        params: LDVAEParams,
        z: Array,
        log_library: Array,
        batch: Array,
        label: Array,
        *,
        split_mask: Array | None = None,
    ) -> Rates:
        if split_mask is not None:
            raise ConfigError("LinearSCVI's decoder is not additive over splits: ablate latents.")
        d = model.generative(params, z, log_library, batch, label, config=self.config)
        return Rates(d.scale, d.mu, d.theta, d.zi_logits)

    def log_prob(self, x: Array, rates: Rates) -> Array:
        assert rates.theta is not None  # LDVAE's decoder always gives theta (Poisson ignores it)
        return log_prob(x, rates.mu, rates.theta, rates.zi_logits, likelihood=self.likelihood)

    def loadings(self, params: LDVAEParams) -> Array:
        return model.affine_head(params.decoder.factor, config=self.config).loadings

    # -- family.AffineFamily: the fast paths ---------------------------------------------------
    def affine_heads(self, params: LDVAEParams) -> list[AffineDecoder]:
        heads = [model.affine_head(params.decoder.factor, config=self.config)]
        if self.likelihood == "zinb":
            heads.append(model.affine_head(params.decoder.dropout, config=self.config))
        return heads

    def dispersion(self, params: LDVAEParams, batch: Array, label: Array) -> Array:
        return model.dispersion(params, batch, label, config=self.config)
