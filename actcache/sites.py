"""Where each activation site lives, per architecture: ONE table.

Site definitions (the same for every architecture):

* ``resid_pre L``  -- the input of block ``L`` (the residual stream before the block).
* ``resid_post L`` -- the output of block ``L`` (= ``resid_pre L+1``).
* ``attn_out L``   -- the attention sub-block's output after its output projection; in Gemma-2/3 after the
  post-attention norm, because that norm's output is what is added to the residual stream.
* ``mlp_out L``    -- the MLP sub-block's output; in Gemma-2/3 after the post-feed-forward norm.

GPT-NeoX may use a parallel residual (attention and MLP both read the block input); the sites are still the
sub-block outputs, so nothing changes here.

The residual sites are hooked on the block itself (pre-hook input / hook output); ``attn_out`` and ``mlp_out``
are hooked on a sub-module whose path relative to the block the table gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SITES: tuple[str, ...] = ("resid_pre", "resid_post", "mlp_out", "attn_out")
"""Every site name, in the store's canonical order."""

MODULE_PATHS_FLAG = "--module-paths"
MODULE_PATHS_EXAMPLE = "layers=model.layers,attn_out=self_attn,mlp_out=mlp"


class SiteError(ValueError):
    """A site, layer or architecture the harvest cannot resolve (the message names the fix)."""


@dataclass(frozen=True)
class ArchSites:
    """Module paths of one architecture's sites."""

    layers: tuple[str, ...]
    """Candidate dotted paths (from the loaded model) of the ``ModuleList`` of blocks; the first that exists
    wins (covers ``*ForCausalLM``, the bare ``*Model`` and multimodal wrappers)."""
    attn_out: str
    """Path of the attention-output module, relative to a block."""
    mlp_out: str
    """Path of the MLP-output module, relative to a block."""
    chained: bool = True
    """Block L's output is block L+1's input, nothing in between, so ``resid_post L`` and ``resid_pre L+1`` are
    one tensor (true of every table entry: the models' forward hands each block's hidden states to the next;
    hand-given ``--module-paths`` prove nothing, so False there)."""


_LLAMA_LIKE = ArchSites(layers=("model.layers", "layers"), attn_out="self_attn", mlp_out="mlp")
# Gemma-2/3 norm each sub-block's output before adding it to the residual (arXiv:2408.00118, section 2).
_GEMMA_SANDWICH = ArchSites(
    layers=("model.layers", "layers", "model.language_model.layers", "language_model.layers"),
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
)

ARCH_TABLE: dict[str, ArchSites] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma2": _GEMMA_SANDWICH,
    "gemma3": _GEMMA_SANDWICH,
    "gemma3_text": _GEMMA_SANDWICH,
    "gpt2": ArchSites(layers=("transformer.h", "h"), attn_out="attn", mlp_out="mlp"),
    "gpt_neox": ArchSites(layers=("gpt_neox.layers", "layers"), attn_out="attention", mlp_out="mlp"),
}
"""model_type (``config.model_type``) -> module paths."""


def parse_module_paths(text: str) -> ArchSites:
    """Parse ``--module-paths`` (``layers=model.layers,attn_out=self_attn,mlp_out=mlp``)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("layers", "attn_out", "mlp_out") or not value:
            raise SiteError(
                f"bad {MODULE_PATHS_FLAG} entry {part!r}: expected e.g. {MODULE_PATHS_FLAG} {MODULE_PATHS_EXAMPLE}"
            )
        fields[key] = value
    if "layers" not in fields:
        raise SiteError(f"{MODULE_PATHS_FLAG} needs layers=..., e.g. {MODULE_PATHS_EXAMPLE}")
    return ArchSites(
        layers=(fields["layers"],),
        attn_out=fields.get("attn_out", ""),
        mlp_out=fields.get("mlp_out", ""),
        chained=False,
    )


def arch_sites(model_type: str, module_paths: str | None = None) -> ArchSites:
    """The table entry of ``model_type``, or the hand-given ``module_paths`` (which win)."""
    if module_paths:
        return parse_module_paths(module_paths)
    try:
        return ARCH_TABLE[model_type]
    except KeyError:
        raise SiteError(
            f"unknown architecture {model_type!r} (known: {', '.join(sorted(ARCH_TABLE))}); give its module "
            f"paths with {MODULE_PATHS_FLAG} {MODULE_PATHS_EXAMPLE}"
        ) from None


def equal_sites(arch: ArchSites, layers: tuple[int, ...], sites: tuple[str, ...]) -> dict[str, str]:
    """The (layer, site) keys that the architecture proves equal to another harvested key: alias -> stored key
    ('acts/resid_pre/16' -> 'acts/resid_post/15'), for the store to hold each tensor once. The only equality the
    table proves is the chained residual stream (``ArchSites.chained``); the sub-block outputs and the residual
    stream differ by construction (resid_post L = resid_pre L + attn_out L + mlp_out L, or the normed sums)."""
    if not arch.chained or not {"resid_pre", "resid_post"} <= set(sites):
        return {}
    held = set(layers)
    return {
        f"acts/resid_pre/{layer + 1}": f"acts/resid_post/{layer}" for layer in layers if layer + 1 in held
    }


def parse_sites(text: str) -> tuple[str, ...]:
    """``resid_pre,mlp_out`` (or ``all``) -> sites in canonical order; unknown names raise SiteError."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return SITES
    unknown = [n for n in names if n not in SITES]
    if unknown or not names:
        raise SiteError(
            f"unknown site {', '.join(unknown) or repr(text)}: choose from {','.join(SITES)} or all"
        )
    return tuple(s for s in SITES if s in names)


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """``all`` | ``5`` | ``0-11`` | ``3,7`` | ``-1`` (last) -> sorted unique layer indices within the model."""
    text = text.strip()
    if text == "all":
        return tuple(range(n_layers))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-") if not part.startswith("-") else ("", "", "")
            if sep:
                if int(hi) < int(lo):
                    raise SiteError(f"bad --layers range {part!r}: write it low-high, e.g. {hi}-{lo}")
                layers.update(range(int(lo), int(hi) + 1))
            else:
                index = int(part)
                layers.add(index + n_layers if index < 0 else index)
    except ValueError:
        raise SiteError(f"bad --layers {text!r}: use all, 5, 0-11 or 3,7") from None
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad or not layers:
        raise SiteError(
            f"layer {bad[0] if bad else text} is outside the model (it has {n_layers} layers: 0-{n_layers - 1})"
        )
    return tuple(sorted(layers))


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or None when the path does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module, sites: ArchSites) -> nn.ModuleList:
    """The model's list of blocks, from the first candidate path that exists."""
    for path in sites.layers:
        blocks = get_submodule(model, path)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise SiteError(
        f"no block list at {' or '.join(sites.layers)} in {type(model).__name__}; give the paths with "
        f"{MODULE_PATHS_FLAG} {MODULE_PATHS_EXAMPLE}"
    )


def site_module(block: nn.Module, sites: ArchSites, site: str) -> nn.Module:
    """The module whose output is ``site`` (``attn_out``/``mlp_out``), or the block for residual sites."""
    if site in ("resid_pre", "resid_post"):
        return block
    path = sites.attn_out if site == "attn_out" else sites.mlp_out
    module = get_submodule(block, path) if path else None
    if module is None:
        raise SiteError(
            f"no {site} module at {path or '(none given)'!r} in {type(block).__name__}; give it with "
            f"{MODULE_PATHS_FLAG} {MODULE_PATHS_EXAMPLE}"
        )
    return module


def first_tensor(output: Any) -> Any:
    """The activation in a module's output (HF blocks and attention modules return tuples)."""
    return output[0] if isinstance(output, tuple | list) else output


def with_first(output: Any, new: Any) -> Any:
    """`output` with its activation replaced by `new` (same container type)."""
    if isinstance(output, tuple | list):
        return type(output)((new, *output[1:]))
    return new


def hook_site(
    block: nn.Module, arch: ArchSites, site: str, fn: Callable[[Tensor], Tensor | None], *, replace: bool
) -> RemovableHandle:
    """Hook ``site`` of one block: ``fn(x)`` sees the site's activation x ([batch, positions, d_model]) at every
    forward; with ``replace`` its return value becomes the activation the model goes on with, else it only
    observes (its return value is ignored; it may raise to end the forward). Returns the hook's handle
    (``.remove()``). ONE place for both the harvest (observe) and the splice (replace).

    ``resid_pre``: a forward pre-hook on the block (its first positional input, or ``hidden_states``);
    ``resid_post``: a forward hook on the block; ``attn_out`` / ``mlp_out``: a forward hook on the sub-module
    (``site_module``). Tuple outputs keep their other members.
    """
    if site == "resid_pre":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x)
            if not replace:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if site not in SITES:
        raise SiteError(f"unknown site {site!r}: choose from {','.join(SITES)}")
    module = site_module(block, arch, site)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = fn(first_tensor(output))
        return with_first(output, new) if replace else None

    return module.register_forward_hook(hook)
