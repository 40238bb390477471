"""Training configs: frozen dataclasses with a docstring per field (the docstrings become `--help` text).

Three levels, so that a sweep can train many SAEs in one loop from the same batches:
- `MemberConfig`: one SAE (variant, where it reads, width, L0 target, learning rate).
- `LoopConfig`: what every member of one loop shares (tokens, batch size, schedule, seed, device, data options).
- `TrainConfig`: `sae train` = a store + one member + a loop. Its flat key space (the union of the field names,
  which are disjoint) is what the CLI options and a TOML config file use.

`SAEConfig` (the saved shape of one SAE) lives in `sae_cli.variants.base` and is re-exported here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from .variants.base import SAEConfig

__all__ = [
    "ConfigError",
    "LoopConfig",
    "MemberConfig",
    "SAEConfig",
    "TrainConfig",
    "field_docs",
    "flat_keys",
    "parse_options",
    "resolve_loop",
    "resolve_width",
]


class ConfigError(ValueError):
    """A config value or key is wrong; the message is one line that names it and the fix."""


@dataclass(frozen=True)
class MemberConfig:
    """One SAE trained by the loop."""

    variant: str = "topk"
    """SAE variant (registry name); `sae variants` lists them."""
    layer: int = 0
    """Layer whose activations the SAE reads."""
    site: str = "resid_post"
    """Site within the layer: resid_pre, resid_post, mlp_out or attn_out."""
    width: str = "8x"
    """Number of latents: an integer (16384) or a multiple of d_model ("8x")."""
    l0_target: float = 50.0
    """Target L0 (mean active latents per token): k for TopK-like variants, the steering target otherwise."""
    lr: float | None = None
    """Peak learning rate; default 2e-4 / sqrt(d_sae / 2^14), doubled for short runs (docs/training.md)."""
    sparsity_coef: float | None = None
    """Fixed sparsity coefficient for steered variants (disables L0 steering); default: steer to --l0-target."""
    options: dict[str, Any] = field(default_factory=dict)
    """Variant-specific options (TOML table `options`), validated by the variant."""
    name: str = ""
    """Member name (sub-folder in a sweep); default derived from variant, width and L0 target."""
    objective: str = "local"
    """Reconstruction objective: local (MSE of the activation), e2e (KL of the LM's next-token distribution with
    the reconstruction spliced in; only the layers after the SAE run, from the stored activations; batches of
    whole windows) or e2e+ds (e2e + MSE of the residual stream at --ds-layers). docs/training.md, "End-to-end
    objective"."""
    init_from: str = ""
    """Start from the SAE in this folder (a run, a sweep member or an imported SAE) instead of a fresh init: same
    variant, d_in and L0 target; its width and options are kept (fine-tuning, e.g. --objective e2e)."""

    def validate(self) -> None:
        """ConfigError (one line, naming the option) for a value that is accepted by its type but meaningless."""
        _check_finite(self, ("l0_target", "lr", "sparsity_coef"))
        if self.l0_target <= 0:
            raise ConfigError(f"--l0-target must be positive, got {self.l0_target:g}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be a positive number, got {self.lr:g}")
        if self.sparsity_coef is not None and self.sparsity_coef < 0:
            raise ConfigError(
                f"--sparsity-coef must be >= 0, got {self.sparsity_coef:g} (a negative coefficient rewards density)"
            )
        resolve_width(self.width, 1)  # syntax check only
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


OBJECTIVES = ("local", "e2e", "e2e+ds")
"""MemberConfig.objective values (docs/training.md, "End-to-end objective")."""


@dataclass(frozen=True)
class LoopConfig:
    """Settings shared by every member trained in one loop."""

    tokens: int = 0
    """Training tokens (the reader loops over the store); 0: one pass, but at least 300 steps, at most 50M tokens."""
    batch_size: int = 0
    """Tokens per optimiser step; 0: 4096, smaller on a small store (train tokens / 32, a power of two, >= 1024)."""
    seed: int = 0
    """Seed of the SAE init, the reader's shuffle and every other random choice."""
    eval_tokens: int = 0
    """Tokens held out at the end of the store (window-aligned) for `sae eval`; 0: 10 % of the store, at most 1M."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many tokens; 0: only at the end and on Ctrl-C / SIGTERM."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    autocast: str = "none"
    """Mixed precision of the SAE forward/backward: none (fp32) or bf16; weights and Adam state stay fp32."""
    normalize: str = "sample"
    """Input scaling c with E||c x||^2 = 1: sample (estimated from training tokens), store (store statistics), none."""
    norm_sample_tokens: int = 16384
    """Tokens used to estimate the input scale and to initialise the SAE (normalize=sample)."""
    calibrate: bool = True
    """After the last step, set every SAE's inference threshold on the calibration tokens under the final weights
    (`SAE.calibrate`: batch-level rules replace their running estimate, steered rules shift to the target L0);
    False: save the thresholds as training left them."""
    calibration_tokens: int = 0
    """Tokens (whole windows) held back from the end of the training range, never trained on, on which the
    batch-level rules calibrate their inference threshold at the end (`SAE.calibrate`). 0: automatic: when the
    run reads the training range more than once, min(16384, 10 % of it); otherwise none, and the calibration uses
    the normalisation sample (training tokens seen at most once)."""
    warmup_steps: int = 1000
    """Learning-rate warm-up steps (at most 5 % of all steps)."""
    decay_fraction: float = 0.2
    """Linear learning-rate decay to zero over this final fraction of the steps."""
    l0_trim_fraction: float = 0.2
    """Steered members: over this final fraction of the steps, shift the firing threshold after each step so the
    batch's L0 equals the target (exact batch quantile; sae_cli/l0_control.py); 0: off, the controller alone."""
    sparsity_warmup_fraction: float = 0.05
    """Linear warm-up of a fixed sparsity coefficient over this fraction of the steps (steered members ramp by control)."""
    grad_normalize: bool = True
    """Scale each SAE's gradient to norm 1 at every step (docs/training.md, "Gradient normalisation"); False: clip
    it at `grad_clip` instead."""
    grad_clip: float = 1.0
    """With grad_normalize off: clip the gradient norm of each SAE to this value (0: off)."""
    dead_window_tokens: int = 0
    """A latent is dead after this many tokens without firing; 0: min(10M, max(total/10, 8 batches))."""
    log_every: int = 10
    """Steps between metric rows (metrics.parquet) and progress callbacks."""
    drop_bos: bool = True
    """Drop BOS positions from the training and evaluation tokens (Gemma Scope)."""
    max_norm_ratio: float = 0.0
    """Drop tokens whose norm exceeds this multiple of the median (massive activations); 0: keep them."""
    mix_chunks: int = 64
    """Chunks the reader mixes to shuffle tokens."""
    threads: int = 2
    """Reader decode threads."""
    member_threads: bool = True
    """On CPU, train the members of a sweep concurrently, each on one intra-op thread (False: one after another,
    each with every thread)."""
    ds_layers: str = ""
    """e2e+ds: the downstream layers (comma list, e.g. 7,8,9,10,11) whose resid_post the spliced model is held to."""
    kl_coef: float | None = None
    """e2e objectives: weight of the KL term; default 1 for e2e, 0.5 for e2e+ds (e2e_sae's GPT-2 configs)."""
    ds_coef: float = 2.5
    """e2e+ds: total weight of the downstream MSE terms, split evenly over --ds-layers (e2e_sae: 2.5)."""

    def validate(self) -> None:
        """ConfigError (one line, naming the option) for a value that is accepted by its type but meaningless;
        runs before anything is allocated or written."""
        floats = (
            "decay_fraction",
            "l0_trim_fraction",
            "sparsity_warmup_fraction",
            "grad_clip",
            "max_norm_ratio",
        )
        _check_finite(self, floats)
        for name in NON_NEGATIVE_INTS:
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.autocast not in ("none", "bf16"):
            raise ConfigError(f"autocast must be none or bf16, got {self.autocast!r}")
        if self.normalize not in ("sample", "store", "none"):
            raise ConfigError(f"normalize must be sample, store or none, got {self.normalize!r}")
        fractions = (self.decay_fraction, self.sparsity_warmup_fraction, self.l0_trim_fraction)
        if not all(0 <= f <= 1 for f in fractions):
            raise ConfigError(
                "decay_fraction, sparsity_warmup_fraction and l0_trim_fraction must lie in [0, 1]"
            )
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0 (0: off), got {self.grad_clip:g}")
        if self.max_norm_ratio != 0 and self.max_norm_ratio <= 1:
            raise ConfigError(
                f"--max-norm-ratio must be 0 (keep every token) or above 1 (a multiple of the median norm), got "
                f"{self.max_norm_ratio:g}"
            )

    def validate_objectives(self, objectives: Iterable[str]) -> None:
        """The loop's options that depend on the members' objectives (ConfigError, one line)."""
        _check_finite(self, ("kl_coef", "ds_coef"))
        if (self.kl_coef is not None and self.kl_coef < 0) or self.ds_coef < 0:
            raise ConfigError("--kl-coef and --ds-coef must be >= 0")
        end_to_end = sorted(set(objectives) - {"local"})
        if end_to_end and self.max_norm_ratio:
            raise ConfigError(
                f"--max-norm-ratio does not apply to --objective {end_to_end[0]} (whole windows are spliced); "
                "leave it at 0"
            )
        layers = parse_layers(self.ds_layers)
        if "e2e+ds" in end_to_end and not layers:
            raise ConfigError("--objective e2e+ds needs --ds-layers (e.g. --ds-layers 7,8,9,10,11)")
        if layers and "e2e+ds" not in end_to_end:
            raise ConfigError("--ds-layers is for --objective e2e+ds; drop it or use e2e+ds")


def parse_layers(text: str | list | tuple) -> tuple[int, ...]:
    """'7,8,9' (or a TOML list, or its text) -> (7, 8, 9); ConfigError on anything else."""
    items = text if isinstance(text, list | tuple) else str(text).strip().strip("[]").split(",")
    try:
        return tuple(sorted({int(str(i).strip()) for i in items if str(i).strip()}))
    except ValueError:
        raise ConfigError(f"bad --ds-layers {text!r}: give layer numbers, e.g. 7,8,9") from None


NON_NEGATIVE_INTS = ("tokens", "batch_size", "seed", "eval_tokens", "checkpoint_every", "calibration_tokens",
                     "warmup_steps", "dead_window_tokens")  # fmt: skip
"""LoopConfig ints where 0 means automatic / off and a negative value means nothing."""
POSITIVE_INTS = ("norm_sample_tokens", "log_every", "mix_chunks", "threads")
"""LoopConfig ints that must be at least 1."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_finite(cfg: Any, names: tuple[str, ...]) -> None:
    """ConfigError for a NaN or infinite float option (typer and TOML both accept 'nan' and 'inf')."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(name)} must be a finite number, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """`sae train`: one SAE from one store."""

    store: str
    """Path of the actcache store."""
    member: MemberConfig = field(default_factory=MemberConfig)
    """The SAE to train."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """How to train it."""

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict (CLI options + TOML keys); unknown key -> ConfigError naming it."""
        member_keys = {f.name for f in dataclasses.fields(MemberConfig)}
        loop_keys = {f.name for f in dataclasses.fields(LoopConfig)}
        unknown = sorted(set(values) - member_keys - loop_keys - {"store"})
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(flat_keys()))}"
            )
        if "store" not in values or not values["store"]:
            raise ConfigError("no store given: pass --store PATH or set store = PATH in the config file")
        member = _typed(MemberConfig, {k: v for k, v in values.items() if k in member_keys})
        loop = _typed(LoopConfig, {k: v for k, v in values.items() if k in loop_keys})
        cfg = cls(store=str(values["store"]), member=member, loop=loop)
        cfg.validate()
        return cfg

    def to_flat(self) -> dict[str, Any]:
        return {"store": self.store, **dataclasses.asdict(self.member), **dataclasses.asdict(self.loop)}

    def validate(self) -> None:
        self.member.validate()
        self.loop.validate()
        self.loop.validate_objectives([self.member.objective])


DEFAULT_BATCH, MIN_AUTO_BATCH, BATCHES_PER_EPOCH = 4096, 1024, 32
DEFAULT_MIN_STEPS, DEFAULT_MAX_TOKENS = 300, 50_000_000


def resolve_loop(loop: LoopConfig, train_tokens: int) -> LoopConfig:
    """Fill the automatic batch size and token count from the size of the training range.

    Short runs need optimiser steps more than tokens per step (docs/training.md, "Defaults for short runs"): on a
    small store the batch shrinks so that an epoch holds >= 32 steps, and the run lasts at least 300 steps
    (several epochs; the reader loops)."""
    batch = loop.batch_size
    if batch == 0:
        fit = 1 << max(0, (train_tokens // BATCHES_PER_EPOCH).bit_length() - 1)  # power of two <= tokens / 32
        batch = max(MIN_AUTO_BATCH, min(DEFAULT_BATCH, fit))
    tokens = loop.tokens or int(min(DEFAULT_MAX_TOKENS, max(train_tokens, DEFAULT_MIN_STEPS * batch)))
    return dataclasses.replace(loop, batch_size=batch, tokens=tokens)


def resolve_width(width: str | int, d_in: int) -> int:
    """`8x` -> 8 * d_in; `16384` -> 16384."""
    text = str(width).strip().lower()
    try:
        if text.endswith("x"):
            mult = float(text[:-1])
            d_sae = int(round(mult * d_in))
        else:
            d_sae = int(text)
    except (ValueError, OverflowError):
        raise ConfigError(
            f"bad width {width!r}: give a number of latents (16384) or a multiple (8x)"
        ) from None
    if d_sae <= 0:
        raise ConfigError(f"width {width!r} gives {d_sae} latents; it must be positive")
    return d_sae


def flat_keys() -> list[str]:
    """Every key the CLI / a TOML config file accepts for `sae train`."""
    return [
        "store",
        *(f.name for f in dataclasses.fields(MemberConfig)),
        *(f.name for f in dataclasses.fields(LoopConfig)),
    ]


def _typed(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate a config dataclass, coercing TOML/CLI values to the annotated types; bad value -> ConfigError."""
    out = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if value is None:
            continue
        kind = hints[key] if isinstance(hints[key], str) else getattr(hints[key], "__name__", str(hints[key]))
        try:
            if kind in ("int",):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out[key] = int(value)
            elif kind in ("float", "float | None"):
                out[key] = float(value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError
                out[key] = value
            elif kind == "str":
                out[key] = str(value)
            elif kind.startswith("dict"):
                if not isinstance(value, dict):
                    raise ValueError
                out[key] = dict(value)
            else:
                out[key] = value
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} expects {kind}, got {value!r}") from None
    return cls(**out)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from the source, as sparsify/simple_parsing do)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_options(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """`--option KEY=VALUE` (repeatable) -> the `options` dict of a member: the value is read as a TOML value
    (`k_aux=256` an int, `flag=true` a bool, `scale=0.5` a float) and otherwise kept as text (`decoder_norm=unit`).
    The same keys as the TOML table `options`; the variant validates them."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise ConfigError(f"bad --option {item!r}: use KEY=VALUE, e.g. --option decoder_norm=unit")
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
    return out
