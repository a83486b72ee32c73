"""torch's ``Adam`` / ``AdamW`` as an optax ``GradientTransformation``, step for step.

torch 2.x (``torch/optim/adam.py``, single-tensor path), for step ``t`` and gradient ``g``:

    g = g + weight_decay * p                      (Adam: L2 added to the gradient)
    m = m + (g - m) * (1 - beta1)                 (exp_avg.lerp_)
    v = v * beta2 + (1 - beta2) * g * g
    denom = sqrt(v) / sqrt(1 - beta2 ** t) + eps  (eps after the bias correction of v)
    p = p - lr / (1 - beta1 ** t) * m / denom

``AdamW`` instead multiplies ``p`` by ``1 - lr * weight_decay`` before the step. The learning
rate lives in the state (``lr``), so ``ReduceLROnPlateau`` can change it between epochs without a
retrace. Leaves whose ``mask`` is False are not moved and keep zero moments, as torch skips
parameters whose gradient is None (no weight decay either).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class TorchAdamState(NamedTuple):
    step: Array  # () int32: steps taken
    mu: Any  # first moments, like params
    nu: Any  # second moments, like params
    lr: Array  # () the current learning rate


def torch_adam(
    lr: float,
    *,
    eps: float = 0.01,
    weight_decay: float = 1e-6,
    betas: tuple[float, float] = (0.9, 0.999),
    decoupled: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """torch ``Adam`` (``decoupled=False``) or ``AdamW`` (``decoupled=True``); updates are
    ``new_params - params``. ``mask``: a tree of bools like the params (None: all trained)."""
    b1, b2 = betas

    def _mask(params: Any) -> Any:
        return jax.tree.map(lambda _: True, params) if mask is None else mask

    def init(params: Any) -> TorchAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TorchAdamState(
            step=jnp.zeros((), jnp.int32),
            mu=zeros,
            nu=jax.tree.map(jnp.zeros_like, params),
            lr=jnp.asarray(lr, jax.tree.leaves(params)[0].dtype),
        )

    def update(grads: Any, state: TorchAdamState, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("torch_adam needs params (weight decay).")
        count = state.step + 1
        t = count.astype(state.lr.dtype)
        bc1 = 1.0 - b1**t
        bc2_sqrt = jnp.sqrt(1.0 - b2**t)
        step_size = state.lr / bc1

        def one(on: bool, g: Array, p: Array, m: Array, v: Array) -> tuple[Array, Array, Array]:
            if not on:
                return jnp.zeros_like(p), m, v
            if not decoupled and weight_decay:
                g = g + weight_decay * p
            m = m + (g - m) * (1.0 - b1)
            v = v * b2 + (1.0 - b2) * g * g
            denom = jnp.sqrt(v) / bc2_sqrt + eps
            u = -step_size * (m / denom)
            if decoupled and weight_decay:
                u = u - state.lr * weight_decay * p
            return u, m, v

        out = jax.tree.map(one, _mask(params), grads, params, state.mu, state.nu)
        treedef: Any = jax.tree.structure(params)
        flat = treedef.flatten_up_to(out)
        updates = treedef.unflatten([o[0] for o in flat])
        mu = treedef.unflatten([o[1] for o in flat])
        nu = treedef.unflatten([o[2] for o in flat])
        return updates, TorchAdamState(step=count, mu=mu, nu=nu, lr=state.lr)

    return optax.GradientTransformation(init, update)
