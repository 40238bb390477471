"""What a sweep is and where it lives: `SweepConfig` (the cross product of lists), the list syntax of the CLI,
and the sweep folder's record (`sweep.json`: read back to resume, to evaluate later, to tabulate)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import io
from .config import ConfigError, LoopConfig, MemberConfig, resolve_width
from .registry import variant_names

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "sae_cli.sweep"
MEMBERS_DIR = "members"


class SweepError(Exception):
    """The sweep cannot run as asked (memory, duplicate members, a folder that is not a sweep); one line + fix."""


@dataclass(frozen=True)
class SweepConfig:
    """`sae sweep`: the cross product of these lists, trained in one loop from one store."""

    store: str
    """Path of the actcache store."""
    variants: tuple[str, ...] = ("topk",)
    """SAE variants (registry names); `sae variants` lists them."""
    layers: tuple[int, ...] = (0,)
    """Layers whose activations the members read."""
    sites: tuple[str, ...] = ("resid_post",)
    """Sites within each layer: resid_pre, resid_post, mlp_out, attn_out."""
    l0_targets: tuple[float, ...] = (50.0,)
    """L0 targets (k for TopK-like variants, the steering target otherwise)."""
    widths: tuple[str, ...] = ("8x",)
    """Widths: numbers of latents (16384) or multiples of d_model (8x)."""
    objectives: tuple[str, ...] = ("local",)
    """Reconstruction objectives (local, e2e, e2e+ds): every member once per objective; with an end-to-end one
    every member trains on the same batches of whole windows."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Settings every member shares (tokens, batch size, seed, schedule, device)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Variant options (`--option KEY=VALUE`, as `sae train`): KEY applies to every member, VARIANT.KEY only to
    the members of that variant."""

    def member_options(self, variant: str) -> dict[str, Any]:
        """The options of one variant's members: the unscoped ones, then its own (VARIANT.KEY) over them."""
        common = {k: v for k, v in self.options.items() if "." not in k}
        own = {k.partition(".")[2]: v for k, v in self.options.items() if k.partition(".")[0] == variant}
        return {**common, **own}

    def members(self) -> list[MemberConfig]:
        """The cross product, ordered by layer, site, variant, width, L0 target, objective (the table's order)."""
        return [
            MemberConfig(
                variant=v,
                layer=layer,
                site=s,
                width=w,
                l0_target=float(k),
                options=self.member_options(v),
                objective=o,
            )  # fmt: skip
            for layer, s, v, w, k, o in itertools.product(
                self.layers, self.sites, self.variants, self.widths, self.l0_targets, self.objectives
            )
        ]

    def validate(self) -> None:
        for name in ("variants", "layers", "sites", "l0_targets", "widths", "objectives"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is empty; give at least one value")
        known = set(variant_names())
        for v in self.variants:
            if v not in known:
                raise ConfigError(f"unknown SAE variant {v!r}; choose from {', '.join(sorted(known))}")
        for key in self.options:
            scope = key.partition(".")[0] if "." in key else None
            if scope is not None and scope not in self.variants:
                raise ConfigError(
                    f"--option {key}: {scope!r} is not one of the sweep's variants ({', '.join(self.variants)})"
                )
        for k in self.l0_targets:
            if not (k > 0 and math.isfinite(k)):
                raise ConfigError(f"--l0-target {k} must be a positive number")
        for w in self.widths:
            resolve_width(w, 1)  # syntax only
        self.loop.validate()  # every numeric option, as `sae train` (0: automatic batch size and tokens)
        for o in self.objectives:
            MemberConfig(objective=o).validate()
        self.loop.validate_objectives(self.objectives)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loop": dataclasses.asdict(self.loop)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        """Inverse of to_dict (sweep.json); loop keys this version does not know are dropped; a sweep recorded
        before options existed has none."""
        known = {f.name for f in dataclasses.fields(LoopConfig)}
        loop = LoopConfig(**{k: v for k, v in d.get("loop", {}).items() if k in known})
        lists = ("variants", "layers", "sites", "l0_targets", "widths")
        options = dict(d.get("options") or {})
        objectives = tuple(d.get("objectives") or ("local",))  # a sweep recorded before the axis: local
        return cls(
            store=str(d["store"]), loop=loop, options=options, objectives=objectives,
            **{k: tuple(d[k]) for k in lists},
        )  # fmt: skip


def parse_list(text: str | None, kind: type = str, what: str = "list") -> tuple[Any, ...]:
    """'a,b, c' -> ('a', 'b', 'c'); spaces also separate (Makefile lists); duplicates dropped, order kept."""
    items = [t for t in str(text or "").replace(",", " ").split() if t]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(
            f"bad {what} {text!r}: expected {kind.__name__} values separated by commas"
        ) from None
    return tuple(dict.fromkeys(values))


def parse_layers(text: str) -> tuple[int, ...]:
    """'3,15' or '0-3' -> layers."""
    out: list[int] = []
    for part in parse_list(text, str, "layers"):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ConfigError(f"bad layers {text!r}: use 15, 3,15 or 0-3") from None
    return tuple(dict.fromkeys(out))


def read_sweep(out: str | Path) -> dict[str, Any]:
    """The record of the sweep in `out` (sweep.json); SweepError when `out` is not a sweep folder."""
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{out} is not a sweep folder (no {SWEEP_FILE}); pass the --out of `sae sweep`")
    meta = io.read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != SWEEP_FORMAT:
        raise SweepError(f"{path} is not an sae sweep file")
    return meta


def saved_config(out: str | Path) -> SweepConfig:
    """The config of the sweep in `out` (to resume it); SweepError when there is none."""
    if not (Path(out) / SWEEP_FILE).is_file():
        raise SweepError(f"nothing to resume in {out}; start without --resume")
    try:
        return SweepConfig.from_dict(read_sweep(out)["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SweepError(
            f"{Path(out) / SWEEP_FILE} is damaged ({type(e).__name__}: {e}); pass --overwrite to start the sweep over"
        ) from None
