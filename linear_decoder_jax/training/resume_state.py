"""The training state written every N epochs and read back to resume after an interruption.

One ``.npz`` file (written to a temporary name, then renamed): every parameter and both Adam
moments under their flat keys (``params/...``, ``mu/...``, ``nu/...``), the optimizer's step
count and learning rate, and a JSON record (``state``) with the epoch, the global step, the
history, the schedulers' states and the run's identity (model and training options, number of
cells), which must match on resume. Minibatch orders and draws are functions of (seed, epoch) and
(seed, step), so nothing else is needed for a resumed run to equal the uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax.errors import CheckpointFormatError, ConfigError
from linear_decoder_jax.params import LDVAEParams, to_flat
from linear_decoder_jax.training.optim import TorchAdamState


class State(NamedTuple):
    params: LDVAEParams
    opt_state: TorchAdamState
    history: dict[str, list[list[float]]]
    step: int  # optimizer steps taken
    epoch: int  # last finished epoch
    lr: float
    plateau: tuple[float, int]  # best, bad epochs
    stopper: tuple[float, int]  # best, wait


def exists(path: str | os.PathLike) -> bool:
    return Path(path).is_file()


def save(path: str | os.PathLike, state: State, identity: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for prefix, tree in (("params", state.params), ("mu", state.opt_state.mu),
                         ("nu", state.opt_state.nu)):  # fmt: skip
        arrays |= {f"{prefix}/{k}": np.asarray(v) for k, v in to_flat(tree).items()}
    arrays["opt/step"] = np.asarray(state.opt_state.step)
    arrays["opt/lr"] = np.asarray(state.opt_state.lr)
    record = {
        "identity": identity,
        "history": state.history,
        "step": state.step,
        "epoch": state.epoch,
        "lr": state.lr,
        "plateau": list(state.plateau),
        "stopper": list(state.stopper),
    }
    arrays["state"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(
    path: str | os.PathLike,
    params: LDVAEParams,
    opt_state: TorchAdamState,
    identity: dict[str, Any],
) -> State:
    """Read a state written by :func:`save` into trees shaped like ``params``/``opt_state``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
        record = json.loads(arrays.pop("state").tobytes().decode())
    except (OSError, ValueError, KeyError) as err:
        msg = f"{path}: not a readable training checkpoint ({type(err).__name__}: {err})."
        raise CheckpointFormatError(msg) from err
    saved = json.loads(json.dumps(record["identity"]))
    if saved != json.loads(json.dumps(identity)):
        changed = sorted(k for k in identity if saved.get(k) != json.loads(json.dumps(identity[k])))
        msg = (
            f"{path} was written by a run with other data or options ({', '.join(changed)} "
            "differ); resume with the same ones, or start afresh without resume."
        )
        raise ConfigError(msg)

    def fill(prefix: str, like: Any) -> Any:
        keys = list(to_flat(like))  # the leaves' flat keys, in leaf order
        treedef = jax.tree.structure(like)
        return jax.tree.unflatten(treedef, [jnp.asarray(arrays[f"{prefix}/{k}"]) for k in keys])

    opt = TorchAdamState(
        step=jnp.asarray(arrays["opt/step"]),
        mu=fill("mu", opt_state.mu),
        nu=fill("nu", opt_state.nu),
        lr=jnp.asarray(arrays["opt/lr"]),
    )
    return State(
        params=fill("params", params),
        opt_state=opt,
        history=record["history"],
        step=int(record["step"]),
        epoch=int(record["epoch"]),
        lr=float(record["lr"]),
        plateau=(float(record["plateau"][0]), int(record["plateau"][1])),
        stopper=(float(record["stopper"][0]), int(record["stopper"][1])),
    )
