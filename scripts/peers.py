"""Adapters that train peer SAEs with the peers' own code, for side-by-side benchmarks (bench_train.py,
bench_quality.py). Needs the second virtualenv `.venv-peers` (sae-lens 6.x, eai-sparsify 1.x; see
`make peers`): import this module only from there.

What each adapter runs per step is the part of the peer's trainer that costs time, called through the
peer's own classes:

- SAELens (sae_lens 6.x): its `SAETrainer.step(batch)` -- activation scaler, `TrainingSAE.training_forward_pass`
  (their loss: MSE + the variant's aux/sparsity terms), the dead-latent bookkeeping, backward, grad-norm
  clipping at 1, torch Adam, lr and coefficient schedulers. Left out: wandb logging, evals, checkpoints, the
  progress bar (none runs per step by default). Variants: topk, jumprelu, batchtopk, standard (= our "relu"),
  gated.
- sparsify (eai-sparsify 1.x): `SparseCoder` -- fused TopK encoder (its own autograd function) + sparse
  (embedding_bag) decoder; its forward returns the FVU and AuxK losses. The step mirrors its `Trainer.fit`:
  decoder rows renormalised before the forward, b_dec = batch mean on the first step, dead-latent mask for
  AuxK, remove the decoder-parallel gradient, optimiser + linear-warm-up scheduler, fired bookkeeping.
  Two optimisers, as its `Trainer` builds them: `optimizer="signum"`, its default (its `SignSGD` inside
  `schedulefree.ScheduleFreeWrapper(momentum=0.95)`, lr 5e-3 / sqrt(d_sae / 2^14), constant; evaluated at the
  schedule-free average, `eval()` mode, as its checkpoints are), and `optimizer="adam"` (torch Adam, lr
  2e-4 / sqrt(d_sae / 2^14), linear warm-up and decay), so that every library can run the same optimiser.

- ours: `OursAdapter` drives our real `sae_cli.trainer.Trainer` (its loop body, `Trainer._step`) behind the
  same interface (`step`, `finish`, `reconstruct`), so that one loop can interleave every contender on the same
  batches; `LoadedSAE` wraps a finished `sae train` run folder for evaluation.

Also here, for both bench scripts: `activation_pool` (batches from a store through our ActivationReader, or
synthetic), `saelens_scaling_factor`, `header` (machine, command, date, versions above every table).

`SPARSIFY_DISABLE_TRITON=1` is set before sparsify is imported: with triton installed on a machine with no
GPU, sparsify's Triton decoder crashes.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

SAELENS_VARIANTS = ("topk", "jumprelu", "batchtopk", "relu", "gated")
SPARSIFY_VARIANTS = ("topk",)


@dataclass(frozen=True)
class PeerConfig:
    """One peer SAE and how to train it. Defaults are the peers' own defaults unless noted."""

    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of latents."""
    k: int
    """k of TopK / BatchTopK; the L0 target of JumpReLU's "quadratic" mode."""
    total_steps: int
    """Number of training steps (sets the schedulers)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(d_sae / 2^14) (OpenAI / sparsify TopK heuristic)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (SAELens and sparsify defaults)."""
    lr_warmup_steps: int = 0
    """Linear lr warm-up steps."""
    lr_decay_steps: int = 0
    """Linear lr decay to 0 over the last steps (SAELens only; sparsify's schedule decays over the whole run)."""
    sparsity_coef: float = 1.0
    """SAELens `l0_coefficient` (jumprelu) or `l1_coefficient` (standard, gated)."""
    sparsity_warmup_steps: int = 0
    """SAELens `l0_warm_up_steps` / `l1_warm_up_steps`."""
    jumprelu_mode: str = "step"
    """SAELens `jumprelu_sparsity_loss_mode`: "step" (DeepMind L0), "quadratic" (Gemma Scope 2, needs k), "tanh"."""
    jumprelu_bandwidth: float = 0.05
    """SAELens `jumprelu_bandwidth` (their default 0.05)."""
    jumprelu_init_threshold: float = 0.01
    """SAELens `jumprelu_init_threshold` (their default 0.01)."""
    dead_window_steps: int = 1000
    """Steps without firing after which a latent is dead (SAELens `dead_feature_window`; sparsify gets the same
    window in tokens)."""
    aux_coef: float = 1 / 32
    """sparsify `auxk_alpha` (its default is 0 = AuxK off; 1/32 is the paper's value, which ours uses)."""
    sparsify_optimizer: str = "adam"
    """sparsify `optimizer`: "signum" (its default: SignSGD + schedule-free) or "adam"."""
    topk_sparse: bool = False
    """SAELens `use_sparse_activations` for topk/batchtopk (COO latents + torch.sparse.mm decode)."""
    normalize: bool = True
    """SAELens: `normalize_activations="expected_average_only_in"` with the scaling factor given to `make_peer`
    (their ActivationScaler; folded into the weights at `finish`). sparsify has no input normalisation."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the SAELens training-SAE config."""

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2**14)


class Peer(Protocol):
    label: str

    def step(self, x_BD: Tensor) -> None:
        """One training step on a raw activation batch [B, d_in] float32."""

    def finish(self) -> None:
        """End of training: fold normalisation, switch to the inference rule."""

    def reconstruct(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Inference rule on raw activations: (x_hat_BD, dense latent activations acts_BF)."""


# ---- SAELens ------------------------------------------------------------------------------------------------


def _saelens_classes(variant: str) -> tuple[type, type]:
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    return {
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
        "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
        "relu": (StandardTrainingSAE, StandardTrainingSAEConfig),
        "gated": (GatedTrainingSAE, GatedTrainingSAEConfig),
    }[variant]


def _saelens_variant_kwargs(variant: str, cfg: PeerConfig) -> dict[str, Any]:
    if variant == "topk":
        return {"k": cfg.k, "use_sparse_activations": cfg.topk_sparse}
    if variant == "batchtopk":
        return {"k": float(cfg.k)}
    if variant == "jumprelu":
        kw: dict[str, Any] = {
            "l0_coefficient": cfg.sparsity_coef,
            "l0_warm_up_steps": cfg.sparsity_warmup_steps,
            "jumprelu_sparsity_loss_mode": cfg.jumprelu_mode,
            "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
            "jumprelu_init_threshold": cfg.jumprelu_init_threshold,
        }
        if cfg.jumprelu_mode == "quadratic":
            kw["target_l0"] = float(cfg.k)
        return kw
    # standard (ReLU + L1 weighted by decoder norms) and gated
    return {"l1_coefficient": cfg.sparsity_coef, "l1_warm_up_steps": cfg.sparsity_warmup_steps}


class SAELensPeer:
    """A SAELens 6.x training SAE driven by SAELens's own `SAETrainer.step`."""

    def __init__(self, variant: str, cfg: PeerConfig, scaling_factor: float | None, seed: int = 0) -> None:
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        if variant not in SAELENS_VARIANTS:
            raise ValueError(f"SAELens adapter has no variant {variant!r}; choose from {SAELENS_VARIANTS}")
        self.label = f"SAELens {variant}"
        self.variant = variant
        torch.manual_seed(seed)
        sae_cls, cfg_cls = _saelens_classes(variant)
        normalize = cfg.normalize and scaling_factor is not None
        sae_cfg = cfg_cls(
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            normalize_activations="expected_average_only_in" if normalize else "none",
            **_saelens_variant_kwargs(variant, cfg),
            **cfg.extra,
        )
        self.sae = sae_cls(sae_cfg)
        lr = cfg.resolved_lr()
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.total_steps * cfg.batch_size,
            train_batch_size_samples=cfg.batch_size,
            lr=lr,
            lr_end=lr,
            lr_warm_up_steps=cfg.lr_warmup_steps,
            lr_decay_steps=cfg.lr_decay_steps,
            adam_beta1=cfg.adam_betas[0],
            adam_beta2=cfg.adam_betas[1],
            device="cpu",
            dead_feature_window=cfg.dead_window_steps,
            feature_sampling_window=max(cfg.total_steps + 1, 2000),
            logger=LoggingConfig(log_to_wandb=False),
        )
        # The data provider is only read by fit() (norm estimate + loop); we call step() ourselves.
        self.trainer = SAETrainer(cfg=trainer_cfg, sae=self.sae, data_provider=iter(()))
        if normalize:
            self.trainer.activation_scaler.scaling_factor = scaling_factor
        self.inference_sae: Any = None

    def step(self, x_BD: Tensor) -> None:
        # fit() does exactly this per step when wandb logging is off.
        self.trainer.step(x_BD)
        self.trainer.n_training_steps += 1

    def finish(self) -> None:
        """fit()'s epilogue (fold the scaling factor), then save + load the inference SAE: BatchTopK becomes
        JumpReLU with its learned threshold, TopK folds its decoder norms."""
        from sae_lens import SAE

        scaler = self.trainer.activation_scaler
        if scaler.scaling_factor is not None:
            self.sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
            scaler.scaling_factor = None
        with tempfile.TemporaryDirectory() as tmp:
            self.sae.save_inference_model(tmp)
            self.inference_sae = SAE.load_from_disk(tmp, device="cpu")
        self.inference_sae.eval()

    @torch.no_grad()
    def reconstruct(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        if self.inference_sae is None:
            raise RuntimeError("call finish() before reconstruct()")
        acts_BF = self.inference_sae.encode(x_BD)
        return self.inference_sae.decode(acts_BF), acts_BF


# ---- sparsify -----------------------------------------------------------------------------------------------


class SparsifyPeer:
    """EleutherAI sparsify's SparseCoder (TopK), one step as its Trainer.fit does it (fvu loss, Adam branch)."""

    def __init__(self, cfg: PeerConfig, seed: int = 0) -> None:
        from sparsify import SparseCoder, SparseCoderConfig
        from transformers import get_linear_schedule_with_warmup

        self.label = f"sparsify topk ({cfg.sparsify_optimizer})"
        torch.manual_seed(seed)
        self.cfg = cfg
        self.sae = SparseCoder(
            cfg.d_in, SparseCoderConfig(num_latents=cfg.d_sae, k=cfg.k), device="cpu", dtype=torch.float32
        )
        self.sched: Any = None
        if cfg.sparsify_optimizer == "signum":  # sparsify.Trainer's default branch
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            lr = cfg.lr if cfg.lr is not None else 5e-3 / math.sqrt(cfg.d_sae / 2**14)
            self.opt = ScheduleFreeWrapper(
                SignSGD([{"params": self.sae.parameters(), "lr": lr}]), momentum=0.95
            )
            self.opt.train()
        elif cfg.sparsify_optimizer == "adam":
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.resolved_lr(), betas=cfg.adam_betas)
            self.sched = get_linear_schedule_with_warmup(self.opt, cfg.lr_warmup_steps, cfg.total_steps)
        else:
            raise ValueError(f"sparsify optimizer {cfg.sparsify_optimizer!r}: choose 'signum' or 'adam'")
        self.tokens_since_fired_F = torch.zeros(cfg.d_sae, dtype=torch.long)
        self.dead_tokens = cfg.dead_window_steps * cfg.batch_size
        self.n_steps = 0

    def step(self, x_BD: Tensor) -> None:
        sae = self.sae
        if self.n_steps == 0:
            sae.b_dec.data = x_BD.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_F = self.tokens_since_fired_F > self.dead_tokens if self.cfg.aux_coef > 0 else None
        out = sae(x=x_BD, y=x_BD, dead_mask=dead_F)
        fired_F = torch.zeros(self.cfg.d_sae, dtype=torch.bool)
        fired_F[out.latent_indices.flatten()] = True
        (out.fvu + self.cfg.aux_coef * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        if self.sched is not None:
            self.sched.step()
        with torch.no_grad():
            self.tokens_since_fired_F += x_BD.shape[0]
            self.tokens_since_fired_F[fired_F] = 0
        self.n_steps += 1

    def finish(self) -> None:
        if self.sched is None:  # schedule-free: the averaged weights, as sparsify saves them (`_checkpoint`)
            self.opt.eval()
        else:
            self.sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def reconstruct(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        top_acts_BK, top_idx_BK, _ = self.sae.encode(x_BD)
        acts_BF = top_acts_BK.new_zeros(x_BD.shape[0], self.cfg.d_sae).scatter_(1, top_idx_BK, top_acts_BK)
        return self.sae.decode(top_acts_BK, top_idx_BK), acts_BF


# ---- ours, behind the same interface -----------------------------------------------------------------------


@dataclass
class _Batch:
    """What our trainer reads from a batch (actcache's Batch minus the token ids)."""

    acts: dict[tuple[int, str], Tensor]
    index: Tensor | None = None


class _NoReader:
    """Our Trainer wants a reader; batches come from `OursAdapter.step` instead."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class OursAdapter:
    """Our real `sae_cli.trainer.Trainer` with one member; `step(x)` runs the trainer's loop body
    (`Trainer._step`: scale, training_loss, backward, the one host sync, gradient projection, clipping, Adam,
    renormalisation, dead-latent counters, L0 controller) on a batch we hand it, so that ours and the peers can
    be interleaved on the same batches. Schedules follow `total_steps` exactly as in `sae train`."""

    def __init__(
        self,
        variant: str,
        d_sae: int,
        l0_target: float,
        key: tuple[int, str],
        sample_BD: Tensor,
        total_steps: int,
        batch_size: int = 4096,
        options: dict[str, Any] | None = None,
        loop_overrides: dict[str, Any] | None = None,
        optimizer: str = "",
        lr: float | None = None,
        beta1: float | None = None,
    ) -> None:
        from sae_cli.config import LoopConfig, MemberConfig
        from sae_cli.trainer import Trainer, plan_member

        self.label = f"ours {variant}"
        self.key = key
        self._tmp = tempfile.TemporaryDirectory()
        member = MemberConfig(
            variant=variant,
            layer=key[0],
            site=key[1],
            width=str(d_sae),
            l0_target=l0_target,
            options=options or {},
            **({"lr": lr} if lr else {}),
        )
        # the run's length in steps, as `sae train` passes it: the default lr includes the short-run factor
        plan = plan_member(member, sample_BD.shape[1], Path(self._tmp.name) / "sae", total_steps, batch_size)
        tokens = total_steps * batch_size
        loop = LoopConfig(tokens=tokens, batch_size=batch_size, device="cpu", **(loop_overrides or {}))
        self.trainer = Trainer([plan], loop, _NoReader(), Path(self._tmp.name) / "run", tokens, device="cpu")
        self.trainer.start({key: sample_BD})
        self.swapped = None
        if beta1 is not None:  # experiment: Adam's beta1 in place of the variant's
            for group in self.trainer.members[0].opt.param_groups:
                group["betas"] = (float(beta1), group["betas"][1])
        if optimizer:  # experiment: another optimiser in place of our Adam (the lr schedule stays ours)
            self.swapped = _swap_optimizer(self.trainer.members[0], optimizer, d_sae)
            self.label += f" ({optimizer})"
        self.sample_BD, self.batch_size = sample_BD, batch_size
        self.max_norm_ratio = float((loop_overrides or {}).get("max_norm_ratio", 0.0))
        self.sae: Any = None

    def step(self, x_BD: Tensor) -> None:
        self.trainer._step(_Batch({self.key: x_BD}))

    def finish(self) -> None:
        """The SAE as `sae train` saves it (training/finish.py): a fresh copy, calibrated (here on the
        normalisation sample: the adapter holds no windows back), the input scale folded in, and with a norm
        filter its out-of-range rule."""
        import dataclasses

        from sae_cli.registry import get_variant
        from sae_cli.training.finish import norm_record

        m = self.trainer.members[0]
        if self.swapped is not None and hasattr(m.opt, "eval"):
            m.opt.eval()  # schedule-free: the averaged weights
        sae = get_variant(m.plan.sae_cfg.variant)(m.plan.sae_cfg)
        sae.load_state_dict(m.sae.state_dict())
        sae.calibrate(self.sample_BD.float() * m.scale, self.batch_size)
        sae.fold_scale(m.scale)
        cutoff = norm_record(self.max_norm_ratio, self.sample_BD).get("norm_cutoff")
        if cutoff is not None:
            sae.cfg = dataclasses.replace(sae.cfg, passthrough_norm=cutoff)
        self.sae = sae.eval()

    @torch.no_grad()
    def reconstruct(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        acts_BF, x_hat_BD = self.sae.reconstruct(x_BD)
        return x_hat_BD, acts_BF


def _swap_optimizer(member: Any, name: str, d_sae: int) -> Any:
    """Replace a member's Adam: "signum" = sparsify's SignSGD in schedule-free (momentum 0.95) at sparsify's lr
    5e-3 / sqrt(d_sae / 2^14); "signum@LR" at lr LR. Our lr multiplier (warm-up, decay) still applies."""
    import dataclasses

    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    kind, _, lr = name.partition("@")
    if kind != "signum":
        raise ValueError(f"unknown optimizer {name!r}")
    lr_value = float(lr) if lr else 5e-3 / math.sqrt(d_sae / 2**14)
    member.plan = dataclasses.replace(member.plan, lr=lr_value)
    member.opt = ScheduleFreeWrapper(
        SignSGD([{"params": member.sae.parameters(), "lr": lr_value}]), momentum=0.95
    )
    member.opt.train()
    return member.opt


class LoadedSAE:
    """A finished run folder of ours (`sae train --out DIR`), evaluated with the same code as the others."""

    def __init__(self, folder: str | Path) -> None:
        from sae_cli import io

        self.sae = io.load_sae(folder).eval()
        self.label = f"ours {self.sae.cfg.variant} ({folder})"

    def step(self, x_BD: Tensor) -> None:
        raise RuntimeError("a loaded SAE is not trained here")

    def finish(self) -> None:
        pass

    @torch.no_grad()
    def reconstruct(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        acts_BF, x_hat_BD = self.sae.reconstruct(x_BD)  # the out-of-range rule applies, as in `sae eval`
        return x_hat_BD, acts_BF


# ---- factory, scaling, timing -------------------------------------------------------------------------------


def make_peer(library: str, variant: str, cfg: PeerConfig, scaling_factor: float | None = None) -> Peer:
    """library "saelens" or "sparsify"; variant in SAELENS_VARIANTS / SPARSIFY_VARIANTS."""
    if library == "saelens":
        return SAELensPeer(variant, cfg, scaling_factor)
    if library == "sparsify":
        if variant not in SPARSIFY_VARIANTS:
            raise ValueError(f"sparsify adapter has no variant {variant!r}; choose from {SPARSIFY_VARIANTS}")
        return SparsifyPeer(cfg)
    raise ValueError(f"unknown peer library {library!r}; choose 'saelens' or 'sparsify'")


def saelens_scaling_factor(batches: Iterable[Tensor], d_in: int) -> float:
    """SAELens's ActivationScaler estimate (`estimate_scaling_factor`, "expected_average_only_in"):
    sqrt(d_in) / mean token norm. Computed here with their formula to avoid their progress bar."""
    norms = torch.cat([x.float().norm(dim=-1) for x in batches])
    return float(d_in**0.5 / norms.mean())


def time_steps(
    step: Callable[[Tensor], object], batches: Iterator[Tensor], warmup: int, steps: int
) -> tuple[float, list[float]]:
    """Run `warmup` untimed steps, then `steps` timed ones; returns (total seconds, per-step seconds)."""
    for _ in range(warmup):
        step(next(batches))
    per_step: list[float] = []
    for _ in range(steps):
        x = next(batches)
        t0 = time.perf_counter()
        step(x)
        per_step.append(time.perf_counter() - t0)
    return sum(per_step), per_step


# ---- shared by the bench scripts: activations and the header -------------------------------------------------


def synthetic_pool(n_batches: int, batch: int, d_in: int = 576, seed: int = 0) -> list[Tensor]:
    """Stand-in activations: a mean offset + a sparse (about 24 of 4 * d_in) non-negative mix of random unit
    directions with exponential magnitudes + small Gaussian noise. Only for when no store exists."""
    gen = torch.Generator().manual_seed(seed)
    n_feat = 4 * d_in
    dirs_FD = torch.randn(n_feat, d_in, generator=gen)
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    offset_D = torch.randn(d_in, generator=gen)
    out = []
    for _ in range(n_batches):
        active_BF = torch.rand(batch, n_feat, generator=gen) < 24 / n_feat
        mags_BF = torch.empty(batch, n_feat).exponential_(1.0, generator=gen) * active_BF
        out.append(offset_D + mags_BF @ dirs_FD + 0.05 * torch.randn(batch, d_in, generator=gen))
    return out


def activation_pool(
    store: str | None,
    key: tuple[int, str],
    batch: int,
    n_batches: int,
    *,
    synthetic: bool = False,
    seed: int = 0,
) -> tuple[list[Tensor], str]:
    """`n_batches` shuffled float32 batches [batch, d] of (layer, site) from the store through our
    ActivationReader (BOS dropped, its default), or synthetic ones when the store is absent.
    Returns (batches, a one-line description of the source)."""
    if store and not synthetic and Path(store).exists():
        from actcache.reader import ActivationReader
        from actcache.store import Store

        reader = ActivationReader(Store.open(store), [key], batch, seed=seed)
        it = iter(reader)
        pool = [next(it).acts[key].float().clone() for _ in range(n_batches)]
        n = reader.store.committed_tokens
        return pool, f"store {store} ({n:,} tokens), layer {key[0]} {key[1]}, BOS dropped, shuffled"
    return synthetic_pool(
        n_batches, batch, seed=seed
    ), "synthetic (no store): sparse mix of random directions, d_in 576"


def header(name: str, argv: list[str], source: str, threads: int) -> str:
    """Machine, command, date and library versions, printed above every table."""
    import datetime
    import importlib.metadata as md
    import platform
    import shlex
    import subprocess

    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in model.splitlines() if ln.startswith("Model name")), "?"
        )
    except OSError:
        model = platform.processor() or "?"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    return "\n".join(
        [
            f"# {name} -- {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"machine: {os.cpu_count()}-core CPU ({model}), {mem_gib:.0f} GiB, no GPU used; torch threads {threads}; "
            f"load average at start {load}",
            f"command: {shlex.join([sys.executable.split('/')[-3] + '/bin/python' if '.venv' in sys.executable else 'python', *argv])}",
            f"versions: torch {torch.__version__}, sae-lens {ver('sae-lens')}, eai-sparsify {ver('eai-sparsify')}, "
            f"actcache-sae {ver('actcache-sae')}",
            f"activations: {source}",
        ]
    )
