"""The objective seam: the reconstruction term the trainer minimises.

A variant owns its sparsity rule, its sparsity loss and its aux losses; where it needs the reconstruction term of
its output x_hat it calls `reconstruction(state, x_BD, x_hat_BD)`, which asks the run's objective
(`StepState.objective`, default `MSE`). The trainer builds the run's objective once (`Trainer(objective=...)`) and
puts it with an `ObjectiveContext` of the step into every `StepState`, so a new objective (the end-to-end KL of
the LM's next-token distribution with the reconstruction spliced in) is added by implementing `Objective` and
passing it to the Trainer, without touching the variants or the loop.

Today's objective is `MSEObjective`: ||x - x_hat||^2 summed over d_in, mean over the batch's tokens (local: it
needs nothing but the two tensors); its log part is "mse". The variants' aux terms (AuxK's FVU of the residual,
Gated's frozen-decoder reconstruction) stay MSE whatever the objective: they are part of the variant's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from .variants.base import StepState


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective gets of the step besides the two tensors."""

    key: tuple[int, str]
    """(layer, site) of the member: where a splice puts the reconstruction."""
    scale: float
    """The member's input scale c: x_BD = c * raw activations, so x_hat_BD / c is the reconstruction in the
    model's units (what an LM splice needs)."""
    batch: Any
    """The reader's batch of the step (actcache.reader.Batch: `acts` {(layer, site): [B, d]} raw, `token_ids` [B]
    int64, `index` [B]: each token's global index in the store, so window = index // context and position =
    index % context). Shuffled token batches do not hold whole windows: an objective that runs the LM's
    downstream layers needs a run whose reader delivers whole windows in order (actcache.reader.iter_windows),
    which the run's set-up chooses; the objective may cache per batch (the members of a sweep share it)."""
    step: int
    """The 0-based step."""


class Recon(NamedTuple):
    loss: Tensor
    """Scalar term to minimise, differentiable with respect to x_hat_BD."""
    parts: dict[str, Tensor]
    """Named detached scalars for the logs; holds the objective's `recon_part`."""


class Objective(Protocol):
    """The reconstruction term. `context` is None when there is no step (the controller's initial coefficient
    on the normalisation sample, a variant called directly): an objective that needs the step's windows then
    returns its local approximation (for the KL objective: the MSE) under the same part name."""

    name: str
    recon_part: str
    """The name of the part that holds the reconstruction term (the L0 controller's initial coefficient sets the
    sparsity term against it)."""

    def __call__(self, x_BD: Tensor, x_hat_BD: Tensor, context: ObjectiveContext | None) -> Recon: ...


class MSEObjective:
    """||x - x_hat||^2 summed over d_in, mean over tokens (methods.md, shared ground); part "mse"."""

    name = "mse"
    recon_part = "mse"

    def __call__(self, x_BD: Tensor, x_hat_BD: Tensor, context: ObjectiveContext | None = None) -> Recon:
        from .variants._common import mse as mse_of

        mse = mse_of(x_hat_BD, x_BD)
        return Recon(mse, {"mse": mse.detach()})


MSE = MSEObjective()
"""The default objective (stateless; shared)."""


def reconstruction(state: StepState | None, x_BD: Tensor, x_hat_BD: Tensor) -> Recon:
    """The reconstruction term of `x_hat_BD` under the step's objective (MSE when the state names none)."""
    if state is None or state.objective is None:
        return MSE(x_BD, x_hat_BD, None)
    return state.objective(x_BD, x_hat_BD, state.context)
