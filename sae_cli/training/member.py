"""A member's live state (SAE, Adam, L0 controller, dead-latent counters, log sums) and its step: forward and
backward, the host check, and the update (gradient reduction and normalisation, Adam, the final L0 trim, the
counters, the controller). `MemberStep` holds what every member's step needs of the run; the loop
(sae_cli/trainer.py) decides when and on which thread each step runs."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import LoopConfig
from ..l0_control import TRIM_RATE, ControllerConfig, L0Controller, initial_coef, trim_to_target
from ..objective import Objective, ObjectiveContext
from ..reducer import Reducer
from ..variants.base import SAE, LossOutput, StepState
from . import rows, schedules
from .errors import StepFailure
from .plan import MemberPlan

log = logging.getLogger("sae_cli.trainer")

ADAM_EPS = 6.25e-10
"""Adam's eps for every variant (OpenAI TopK, arXiv 2406.04093); the betas are the variant's (`SAE.adam_betas`)."""


@dataclass
class Member:
    """A member's live state: the SAE, its optimiser, controller and dead-latent counters."""

    plan: MemberPlan
    sae: SAE
    opt: torch.optim.Adam
    scale: float
    controller: L0Controller | None
    since_fired_F: Tensor
    """Tokens since each latent last fired (int64)."""
    freq_F: Tensor
    """EMA firing frequency per latent (time constant: the dead window)."""
    sums: dict[str, float] = field(default_factory=dict)
    """Scalars summed since the last log row (means are logged)."""
    n_sums: int = 0


@dataclass
class Pass:
    """A member's forward and backward of one step: loss output, the step's state, its scaled batch, and the
    numbers the host checks (data finite, loss, L0, loss parts, gradient norm)."""

    out: LossOutput
    state: StepState
    x_BD: Tensor
    check: Tensor


@dataclass(frozen=True)
class MemberStep:
    """What a member's step needs of the run: the loop settings, its length in steps, the dead window, the
    device, the process-group reducer and the reconstruction objective."""

    loop: LoopConfig
    n_steps: int
    window: int
    device: torch.device
    reducer: Reducer
    objective: Objective
    """The members' objective unless `objectives` holds the one their plan names."""
    objectives: dict[str, Objective] = field(default_factory=dict)

    def objective_of(self, m: Member) -> Objective:
        return self.objectives.get(m.plan.objective, self.objective)

    def build(self, plan: MemberPlan, sae: SAE, scale: float) -> Member:
        """A member around `sae` (already on the device): Adam, a controller when steered, zero counters."""
        opt = torch.optim.Adam(sae.parameters(), lr=plan.lr, betas=plan.betas, eps=ADAM_EPS)
        controller = None
        if plan.steered:
            controller = L0Controller(
                ControllerConfig.for_run(plan.sae_cfg.l0_target, self.n_steps, gain=sae.l0_gain)
            )
        F = plan.sae_cfg.d_sae
        return Member(
            plan=plan,
            sae=sae,
            opt=opt,
            scale=scale,
            controller=controller,
            since_fired_F=torch.zeros(F, dtype=torch.int64, device=self.device),
            freq_F=torch.zeros(F, dtype=torch.float32, device=self.device),
        )

    @torch.no_grad()
    def init_controller(self, m: Member, x_BD: Tensor) -> None:
        """lambda_0 from the loss parts of the freshly initialised SAE (l0_control.initial_coef): the sparsity
        term against the objective's reconstruction term."""
        objective = self.objective_of(m)
        state = StepState(0, self.n_steps, 0.0, objective=objective)
        out = m.sae.training_loss(x_BD.to(self.device), state)
        recon, sparsity = (float(out.parts.get(k, math.nan)) for k in (objective.recon_part, "sparsity"))
        init = initial_coef(recon, sparsity)
        cfg = ControllerConfig.for_run(m.plan.sae_cfg.l0_target, self.n_steps, init, m.sae.l0_gain)
        m.controller = L0Controller(cfg)
        log.info("%s: initial sparsity coefficient %.3g", m.plan.name, init)

    def coef(self, m: Member, step: int) -> float:
        if m.controller is not None:
            return m.controller.coef
        return schedules.fixed_coef(m.plan.fixed_coef, step, self.n_steps, self.loop)

    def forward_backward(self, m: Member, batch: Any, step: int) -> Pass:
        x_BD = batch.acts[m.plan.key].to(self.device, non_blocking=True).float() * m.scale
        state = StepState(
            step=step,
            total_steps=self.n_steps,
            sparsity_coef=self.coef(m, step),
            dead_F=m.since_fired_F >= self.window,
            freq_F=m.freq_F,
            objective=self.objective_of(m),
            context=ObjectiveContext(m.plan.key, m.scale, batch, step),
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.loop.autocast == "bf16"):
            out = m.sae.training_loss(x_BD, state)
        m.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        parts = [out.loss.detach().float(), out.l0.float(), *(v.float() for v in out.parts.values())]
        grad_norm = global_grad_norm(m.sae.parameters())  # logged; before projection, normalisation
        check = torch.stack([torch.isfinite(x_BD).all().float(), *parts, grad_norm])
        return Pass(out, state, x_BD, check)

    def host_values(self, checks: list[Tensor]) -> list[float]:
        """The ONE host sync of a step: the members' check vectors, averaged over the ranks (data finite, loss,
        the L0 the controllers steer on, the parts and gradient norms the log rows sum)."""
        values = checks[0] if len(checks) == 1 else torch.cat(checks)
        return self.reducer.mean_(values).tolist()

    def check(self, m: Member, p: Pass, values: list[float], batch: Any, step: int, tokens: int) -> None:
        """Raise StepFailure for bad data or a non-finite loss (`values`: the host copy of `p.check`), else add
        the step's numbers to the member's log sums."""
        data_ok, loss, l0, *parts, grad_norm = values
        if data_ok != 1.0:
            x = batch.acts[m.plan.key]
            bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
            where = ""
            if getattr(batch, "index", None) is not None and bad.numel():
                where = f" at store token {int(batch.index[bad[0]])}"
            raise StepFailure(
                f"NaN/Inf in the activations of layer {m.plan.key[0]} {m.plan.key[1]}{where} (array "
                f"acts/{m.plan.key[1]}/{m.plan.key[0]}, step {step + 1}, tokens {tokens})",
                "run `actcache verify` on the store; if it passes, the model wrote them: harvest again in fp32",
            )
        if not math.isfinite(loss) or not all(math.isfinite(v) for v in parts):
            raise StepFailure(
                f"member {m.plan.name}: loss is {loss} at step {step + 1} (tokens {tokens})",
                "lower --lr or check the data",
            )
        rows.accumulate(m.sums, loss, l0, dict(zip(p.out.parts, parts, strict=True)), grad_norm)
        m.n_sums += 1

    def update(self, m: Member, p: Pass, step: int, n_tokens: int) -> None:
        """The optimizer step and what follows it: the L0 trim, dead-latent counters, controller, log sums.
        `n_tokens`: the step's tokens over all ranks."""
        lr_mult = schedules.lr_multiplier(step, self.n_steps, self.loop)
        self.reducer.mean_all_([q.grad for q in m.sae.parameters() if q.grad is not None])
        m.sae.before_optimizer_step()
        if self.loop.grad_normalize:
            normalize_grad_(m.sae.parameters())
        elif self.loop.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.sae.parameters(), self.loop.grad_clip)
        for group in m.opt.param_groups:
            group["lr"] = m.plan.lr * lr_mult
        m.opt.step()
        m.sae.reduce_batch_stats(self.reducer)
        m.sae.after_optimizer_step()
        trim = None
        if m.controller is not None and step >= schedules.trim_start(self.n_steps, self.loop):
            trim = trim_to_target(
                m.sae, p.x_BD, m.plan.sae_cfg.l0_target, TRIM_RATE, m.controller.trim_shift, self.reducer
            )
        self.track(m, p.out.fired_F, n_tokens)
        if m.controller is not None:
            # While the trim holds the L0, lambda follows the L0 the SAE would have without the trim: the
            # trim closes the gap at once, lambda drains it (docs/training.md, "Steering the L0").
            if trim is not None:
                m.controller.trim_shift += trim.shift
            m.controller.update(trim.l0_untrimmed if trim is not None else m.sums["l0_last"])
        if schedules.logging_next(step, self.n_steps, self.loop):
            m.sums["fvu"] = m.sums.get("fvu", 0.0) + rows.batch_fvu(p.x_BD, p.out.x_hat_BD, self.reducer)
            m.sums["n_fvu"] = m.sums.get("n_fvu", 0.0) + 1
        m.sums["lr"] = m.plan.lr * lr_mult
        m.sums["sparsity_coef"] = p.state.sparsity_coef

    @torch.no_grad()
    def track(self, m: Member, fired_F: Tensor, n_tokens: int) -> None:
        """Dead-latent counters and firing frequencies from the step's firing counts (summed over the ranks)."""
        fired_F = self.reducer.sum_(fired_F.to(self.device))
        m.since_fired_F += n_tokens
        m.since_fired_F[fired_F > 0] = 0
        rate = min(1.0, n_tokens / self.window)
        m.freq_F.mul_(1 - rate).add_(fired_F.float() / n_tokens, alpha=rate)


@torch.no_grad()
def global_grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The L2 norm of all gradients of `params` together (fp32; 0 when none has a gradient)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


@torch.no_grad()
def normalize_grad_(params: Iterable[Tensor]) -> None:
    """Scale the gradients of `params` together to global norm 1 (no-op on a zero gradient). Adam is invariant to
    a constant gradient scale, so what this changes is how steps weigh against each other: without it, the large
    gradients of the first steps and of batches with a massive-norm token (up to ~700x the median on SmolLM2)
    fill Adam's second moment, which remembers ~1/(1 - beta2) = 1000 steps, and shrink the later updates
    (docs/training.md, "Gradient normalisation")."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norm = global_grad_norm(params)
    scale = torch.where(norm > 0, 1.0 / norm, torch.ones_like(norm))
    torch._foreach_mul_(grads, scale)
