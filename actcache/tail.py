"""Run only the blocks after layer L of a frozen causal LM, from a cached residual stream (the e2e objective).

The store holds the residual stream after block L (``resid_post L`` = ``resid_pre L+1``) of whole context
windows. `Tail` feeds it to blocks L+1 .. n-1 exactly as the model's own forward would, then the final norm and
the LM head; blocks 0..L and the embedding never run. What the model computes at the model level is computed
here once per call, the same way, for every architecture of the site table:

* position ids ``0..C-1`` (every cached row is a whole window starting at position 0);
* rotary embeddings from the model's own rotary module (Gemma-3: one per layer type, local and global);
  GPT-2's absolute position embeddings are already in the cached residual (added before block 0);
* the attention masks from transformers' own mask builders (causal; sliding-window for Gemma-2/3's sliding
  layers, Mistral's ``sliding_window`` and Qwen2's sliding layers), in the model's attention implementation.
  No padding mask: padding sits at the end of a window, so no real token attends to it;
* Gemma's embedding scale is not applied again (it is inside the cached residual);
* the final norm, the LM head and Gemma-2's final logit soft-capping (``head``).

The model's parameters are constants: `Tail` sets ``requires_grad=False`` on all of them (again at every call, in
case a caller turned them back on) and puts the model in eval mode, so a loss on its output backpropagates into
the residual it was given (an SAE's reconstruction) and never creates a gradient buffer on the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .sites import ARCH_TABLE, ArchSites, first_tensor, get_submodule

SUPPORTED: tuple[str, ...] = tuple(sorted(ARCH_TABLE))
"""``config.model_type`` values the tail supports: those of the site table."""

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")


class TailError(ValueError):
    """An architecture, layer or site the tail forward cannot start from (the message names the fix)."""


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _find_base(model: nn.Module, arch: ArchSites) -> tuple[nn.Module, nn.ModuleList]:
    """(the module that owns the block list and the final norm, the block list)."""
    for path in arch.layers:
        blocks = get_submodule(model, path)
        if isinstance(blocks, nn.ModuleList):
            parent = path.rpartition(".")[0]
            base = get_submodule(model, parent) if parent else model
            if base is not None:
                return base, blocks
    raise TailError(
        f"no block list at {' or '.join(arch.layers)} in {type(model).__name__}: the e2e tail supports the "
        f"site table's architectures ({', '.join(SUPPORTED)}); train it with --objective local"
    )


class Tail:
    """Runs only the blocks after `layer` of a frozen HF causal LM, from a cached residual stream.

    ``layer`` may be -1: the input is then the embedding output (``resid_pre 0``) and every block runs."""

    def __init__(self, model: nn.Module, arch: ArchSites, layer: int) -> None:
        config = getattr(model, "config", None)
        text = _text_config(config) if config is not None else None
        model_type = getattr(text, "model_type", None) or type(model).__name__
        if model_type not in ARCH_TABLE and getattr(config, "model_type", None) not in ARCH_TABLE:
            raise TailError(
                f"architecture {model_type!r} ({type(model).__name__}) is not supported by the e2e tail "
                f"(supported: {', '.join(SUPPORTED)}); train it with --objective local"
            )
        if getattr(text, "use_bidirectional_attention", False):
            raise TailError(
                f"{model_type!r} with use_bidirectional_attention is not a causal LM: the e2e tail needs causal "
                "attention; train it with --objective local"
            )
        self.model, self.arch, self.model_type = model, arch, model_type
        self.base, self.blocks = _find_base(model, arch)
        self.config = getattr(self.base, "config", text)
        self.n_layers = len(self.blocks)
        if not -1 <= layer < self.n_layers:
            raise TailError(
                f"layer {layer} is outside the model ({self.n_layers} layers: 0-{self.n_layers - 1})"
            )
        self.layer = layer
        self.norm = self._final_norm()
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is None:
            raise TailError(f"{type(model).__name__} has no LM head: load the model as a causal LM")
        self.lm_head: nn.Module = lm_head
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.rotary: nn.Module | None = getattr(self.base, "rotary_emb", None)
        self._rotary_by_type = (
            self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        )
        self.layer_types = [self._layer_type(i) for i in range(self.n_layers)]
        self.blocks_run = 0
        model.eval()
        self._freeze()

    # -- setup ----------------------------------------------------------------------------------------------

    def _final_norm(self) -> nn.Module:
        for name in _NORM_NAMES:
            norm = getattr(self.base, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise TailError(
            f"no final norm ({' / '.join(_NORM_NAMES)}) on {type(self.base).__name__} ({self.model_type!r}); "
            "train it with --objective local"
        )

    def _layer_type(self, i: int) -> str:
        """``full_attention`` or ``sliding_attention``: the mask block i gets in the model's own forward."""
        types = getattr(self.config, "layer_types", None)
        if types:
            kind = types[i]
            if kind not in ("full_attention", "sliding_attention"):
                raise TailError(
                    f"{self.model_type!r} layer {i} has attention type {kind!r}, which the e2e tail does not "
                    "build; train it with --objective local"
                )
            return kind
        # Mistral: one mask for every layer, sliding when the config has a window.
        if self.model_type == "mistral" and getattr(self.config, "sliding_window", None):
            return "sliding_attention"
        return "full_attention"

    def _freeze(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)

    @property
    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = next(self.norm.parameters(), None)
        if p is None:
            p = next(self.model.parameters())
        return p.dtype, p.device

    # -- forward --------------------------------------------------------------------------------------------

    def _masks(self, h: Tensor, position_ids: Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        builders: dict[str, Callable] = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        kinds = {self.layer_types[i] for i in range(self.layer + 1, self.n_layers)}
        return {
            kind: builders[kind](
                config=self.config,
                inputs_embeds=h,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            )
            for kind in kinds
        }

    def _position_embeddings(self, h: Tensor, position_ids: Tensor) -> dict[str, Any]:
        if self.rotary is None:
            return {}
        kinds = {self.layer_types[i] for i in range(self.layer + 1, self.n_layers)}
        if self._rotary_by_type:
            return {kind: self.rotary(h, position_ids, kind) for kind in kinds}
        shared = self.rotary(h, position_ids)
        return {kind: shared for kind in kinds}

    def final_hidden(self, resid_BCD: Tensor, keep: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """Blocks layer+1 .. n-1 and the final norm on the residual stream after block `layer` (whole windows,
        positions 0..C-1) -> (hidden states after the final norm [B, C, D], {l: resid_post l for l in keep}).
        In the model's dtype, on its device; differentiable w.r.t. `resid_BCD`."""
        bad = [k for k in keep if not self.layer < k < self.n_layers]
        if bad:
            raise TailError(
                f"keep layer {bad[0]} is not after layer {self.layer} in the model ({self.n_layers} layers)"
            )
        if resid_BCD.ndim != 3:
            raise TailError(
                f"the tail takes [windows, positions, d_model], got shape {tuple(resid_BCD.shape)}"
            )
        self._freeze()
        dtype, device = self._dtype_device
        h = resid_BCD.to(device=device, dtype=dtype)
        position_ids = torch.arange(h.shape[1], device=device)[None]
        masks = self._masks(h, position_ids)
        rope = self._position_embeddings(h, position_ids)
        kept: dict[int, Tensor] = {}
        for i in range(self.layer + 1, self.n_layers):
            kind = self.layer_types[i]
            kwargs: dict[str, Any] = {"attention_mask": masks[kind], "position_ids": position_ids}
            if kind in rope:
                kwargs["position_embeddings"] = rope[kind]
            h = first_tensor(self.blocks[i](h, **kwargs))
            self.blocks_run += 1
            if i in keep:
                kept[i] = h
        return self.norm(h), kept

    def head(self, h: Tensor) -> Tensor:
        """The LM head on final hidden states (any leading shape: a chunk of positions) -> logits, with Gemma-2's
        final logit soft-capping."""
        self._freeze()
        logits = self.lm_head(h)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, resid_BCD: Tensor) -> Tensor:
        """head(final_hidden(resid)[0]): the model's logits [B, C, vocab] from the residual after `layer`."""
        return self.head(self.final_hidden(resid_BCD)[0])

    def head_only(self, resid_BCD: Tensor) -> Tensor:
        """Final norm + LM head on the residual stream after the LAST block (whatever this tail's layer): the
        clean logits from a stored last-layer ``resid_post``, no block runs."""
        self._freeze()
        dtype, device = self._dtype_device
        return self.head(self.norm(resid_BCD.to(device=device, dtype=dtype)))
