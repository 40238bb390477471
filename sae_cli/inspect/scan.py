"""The one pass of `sae inspect`: the SAE encoder over the cached activations of a token range, in store order
(whole context windows, `actcache.windows.iter_windows`), and per latent: how often it fires, its mean activation
when it fires, a histogram of its activations, its top-N contexts and a uniform sample of its firings (for the
contexts of lower quantiles). Several SAEs of one (layer, site) share the pass (the windows are read once).

Everything per batch is tensor work on the sparse firings of the batch (one `nonzero` of the dense [B, F]
activations, then bincounts and two `TopBuffer` merges); nothing loops over latents. BOS and padding tokens are
dropped as in training and `sae eval` (their activations count as zero and never fire)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from actcache.reader import iter_windows
from actcache.store import FLAG_BOS, FLAG_PAD, Store

from ..data import check_finite
from .topbuf import Candidates, TopBuffer

HIST_PER_OCTAVE = 4
"""Histogram bins per factor of 2 of the activation."""
HIST_LOG2_RANGE = (-16, 16)
"""Activations below 2**-16 fall in the first bin, those above 2**16 in the last."""


@dataclass(frozen=True)
class ScanConfig:
    """What the pass keeps per latent."""

    top: int = 20
    """Top-activating contexts per latent."""
    samples: int = 24
    """Uniformly sampled firings per latent (the contexts of lower activation quantiles)."""
    before: int = 12
    """Tokens shown before the firing token of a context (within its context window)."""
    after: int = 4
    """Tokens shown after it."""
    windows: int = 16
    """Context windows per batch of the pass."""
    seed: int = 0
    """Seed of the random keys of the sample."""

    @property
    def span(self) -> int:
        return self.before + 1 + self.after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hist_edges() -> Tensor:
    """The activation value at the lower edge of each histogram bin, and the upper edge of the last."""
    lo, hi = HIST_LOG2_RANGE
    return torch.exp2(torch.arange(lo * HIST_PER_OCTAVE, hi * HIST_PER_OCTAVE + 1) / HIST_PER_OCTAVE)


class LatentScan:
    """The running statistics of one SAE's latents over the pass."""

    def __init__(self, d_sae: int, cfg: ScanConfig, device: str | torch.device = "cpu") -> None:
        self.cfg, self.d_sae = cfg, d_sae
        lo, hi = HIST_LOG2_RANGE
        self.n_bins = (hi - lo) * HIST_PER_OCTAVE
        self.tokens = 0
        """Tokens seen (BOS and padding excluded): the denominator of the firing frequency."""
        self.count_F = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum_F = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist_FH = torch.zeros(d_sae, self.n_bins, dtype=torch.int64, device=device)
        self.top = TopBuffer(d_sae, cfg.top, cfg.span, device)
        self.sample = TopBuffer(d_sae, cfg.samples, cfg.span, device)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def update(self, acts_BF: Tensor, ids_B: Tensor, valid_B: Tensor, start: int, context: int) -> None:
        """One batch of whole windows: `acts_BF` the latents of tokens start .. start+B-1 (modified: the rows of
        invalid tokens are zeroed), `ids_B` their token ids, `valid_B` False for BOS / padding."""
        acts_BF[~valid_B] = 0
        self.tokens += int(valid_B.sum())
        b_C, f_C = acts_BF.nonzero(as_tuple=True)  # row-major: token order
        v_C = acts_BF[b_C, f_C]
        self.count_F += torch.bincount(f_C, minlength=self.d_sae)
        self.sum_F.index_add_(0, f_C, v_C.double())
        lo = HIST_LOG2_RANGE[0] * HIST_PER_OCTAVE
        bin_C = (torch.floor(torch.log2(v_C.abs()) * HIST_PER_OCTAVE) - lo).clamp(0, self.n_bins - 1).long()
        self.hist_FH.view(-1).index_add_(0, f_C * self.n_bins + bin_C, torch.ones_like(bin_C))
        payload = self._payload(acts_BF, ids_B, start, context)
        self.top.offer(Candidates(f_C, v_C, start + b_C, v_C), payload)
        rand_C = torch.rand(len(f_C), generator=self.generator, device=v_C.device)
        self.sample.offer(Candidates(f_C, rand_C, start + b_C, v_C), payload)

    def _payload(
        self, acts_BF: Tensor, ids_B: Tensor, start: int, context: int
    ) -> Callable[[Candidates], tuple[Tensor, Tensor]]:
        """The latent's activations and the token ids of the `span` tokens around each kept firing, cut at the
        edges of its context window (outside: activation 0, token id -1)."""
        offsets_S = torch.arange(-self.cfg.before, self.cfg.after + 1, device=acts_BF.device)

        def payload(c: Candidates) -> tuple[Tensor, Tensor]:
            b_C = c.token_C - start
            pos_CS = (b_C % context)[:, None] + offsets_S
            inside_CS = (pos_CS >= 0) & (pos_CS < context)
            rows_CS = (b_C - b_C % context)[:, None] + pos_CS.clamp(0, context - 1)
            span_CS = acts_BF[rows_CS, c.latent_C[:, None]] * inside_CS
            ids_CS = torch.where(inside_CS, ids_B[rows_CS], -1).int()
            return span_CS, ids_CS

        return payload

    # ---- results ------------------------------------------------------------------------------------------
    def freq_F(self) -> Tensor:
        """Firing frequency per latent."""
        return self.count_F.double() / max(1, self.tokens)

    def mean_F(self) -> Tensor:
        """Mean activation per latent over the tokens it fires on (0 for a latent that never fires)."""
        return self.sum_F / self.count_F.clamp(min=1)

    def state(self) -> dict[str, Tensor]:
        """Every tensor of the scan, named for a safetensors file (`from_state` rebuilds it)."""
        return {
            "tokens": torch.tensor([self.tokens]),
            "count_F": self.count_F, "sum_F": self.sum_F, "hist_FH": self.hist_FH,
            **self.top.state("top"), **self.sample.state("sample"),
        }  # fmt: skip

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], cfg: ScanConfig) -> LatentScan:
        scan = cls(int(tensors["count_F"].numel()), ScanConfig(**{**cfg.to_dict(), "top": 0, "samples": 0}))
        scan.cfg = cfg
        scan.tokens = int(tensors["tokens"][0])
        scan.count_F, scan.sum_F, scan.hist_FH = tensors["count_F"], tensors["sum_F"], tensors["hist_FH"]
        scan.top, scan.sample = TopBuffer.from_state(tensors, "top"), TopBuffer.from_state(tensors, "sample")
        return scan

    def to(self, device: str | torch.device) -> LatentScan:
        """The scan's tensors moved to `device` (the renderer reads them on the CPU)."""
        for name in ("count_F", "sum_F", "hist_FH"):
            setattr(self, name, getattr(self, name).to(device))
        for buf in (self.top, self.sample):
            for k in ("key_FN", "token_FN", "value_FN", "span_FNS", "ids_FNS"):
                setattr(buf, k, getattr(buf, k).to(device))
        return self


def scan(
    store: Store,
    key: tuple[int, str],
    token_range: tuple[int, int],
    encoders: Sequence[Callable[[Tensor], Tensor]],
    d_saes: Sequence[int],
    cfg: ScanConfig = ScanConfig(),
    *,
    drop_bos: bool = True,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[LatentScan]:
    """One pass over the whole windows of `token_range` of (layer, site) `key`, every encoder (activations
    [B, d_in] -> latents [B, d_sae]) on each batch; one `LatentScan` per encoder."""
    scans = [LatentScan(d, cfg, device) for d in d_saes]
    context = store.spec.context
    lo, hi = token_range
    done = 0
    with torch.no_grad():
        for wb in iter_windows(store, [key], token_range, windows=cfg.windows):
            x_BD = wb.acts[key].flatten(0, 1)
            check_finite(x_BD, None, store, key)
            x_BD = x_BD.to(device)
            flags_B = wb.flags.flatten().to(device)
            valid_B = (flags_B & FLAG_PAD) == 0
            if drop_bos:
                valid_B &= (flags_B & FLAG_BOS) == 0
            ids_B = wb.token_ids.flatten().to(device)
            for encode, s in zip(encoders, scans, strict=True):
                s.update(encode(x_BD).float(), ids_B, valid_B, wb.start, context)
            done += len(x_BD)
            if progress is not None:
                progress(done, hi - lo)
    return scans
