"""EleutherAI sparsify folders (`SparseCoder.load_from_disk`): `cfg.json` + `sae.safetensors`.

`encoder.weight [L, d_in]`, `encoder.bias [L]`, `W_dec [L, d_in]`, `b_dec [d_in]`; cfg.json holds `k`,
`activation` ("topk"), `d_in`, `num_latents`, and `transcode` / `skip_connection` (then also `W_skip`).
encode: top-k of ReLU(encoder(x - b_dec)); decode: acts W_dec + b_dec. That is our `topk` with
decoder_norm="unit" (the rule reads the weights as they are). Transcoders, skip connections and the "groupmax"
activation have no form here and are refused. The folder's name is sparsify's hookpoint (`layers.15` = the
output of block 15 = our resid_post 15; `layers.15.mlp` = mlp_out 15), which gives the layer and site unless
`--layer` / `--site` say otherwise.
"""

from __future__ import annotations

from pathlib import Path

from . import common as C
from .meta import imported_training, parse_hook_name, resolve_place

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def _check_cfg(cfg: dict, where: Path) -> int:
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise C.FormatError(
            f"{where}: unknown activation {activation!r}; only sparsify's 'topk' has a form here"
        )
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise C.FormatError(
                f"{where}: {flag}=true (a transcoder / skip connection) is not an SAE of ours"
            )
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise C.FormatError(f"{where} has no positive integer 'k' (got {k!r})")
    return k


def import_sparsify(
    src: Path, out: Path, *, layer: int | None = None, site: str | None = None, model: str | None = None,
    l0_target: float | None = None, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Read a sparsify SAE folder into our run folder `out`."""
    from ..io import save_sae

    src = Path(src)
    cfg = C.read_json_file(src / CFG_FILE)
    k = _check_cfg(cfg, src / CFG_FILE)
    path = src / WEIGHTS_FILE
    state = C.read_safetensors(path)
    n_latents, d_in = C.dims(state, "encoder.weight", 2, path)
    if cfg.get("d_in") not in (None, d_in):
        raise C.FormatError(
            f"{src / CFG_FILE} says d_in {cfg['d_in']} but encoder.weight is {(n_latents, d_in)}"
        )
    if k > n_latents:
        raise C.FormatError(f"{src / CFG_FILE}: k {k} exceeds the {n_latents} latents")
    C.unexpected(state, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, path, "sparsify SAE")
    params = {
        "W_enc_FD": C.take(state, "encoder.weight", (n_latents, d_in), path),
        "b_enc_F": C.take(state, "encoder.bias", (n_latents,), path),
        "W_dec_FD": C.take(state, "W_dec", (n_latents, d_in), path),
        "b_dec_D": C.take(state, "b_dec", (d_in,), path),
    }
    where = resolve_place(parse_hook_name(src.resolve().name), layer, site, src, "its folder is no hookpoint")
    sae = C.build_sae("topk", d_in, n_latents, l0_target or k, params, decoder_norm="unit")
    training = imported_training("sparsify", src, *where, model, {"hookpoint": src.resolve().name, "k": k})
    with C.whole_folder(out, overwrite) as tmp:
        save_sae(tmp, sae, training)
    return Path(out)
