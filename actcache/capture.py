"""Capture hooks of the harvest: copy every (layer, site) of a forward batch into a shard buffer and accumulate
its statistics on the device; a last hook ends the forward after the last needed module. The sites are hooked by
`actcache.sites.hook_site`, the one hook the splice (sae_cli/splice.py) uses too."""

from __future__ import annotations

import torch
from torch import nn

from .sites import ArchSites, hook_site
from .store import acts_key


class _StopForward(Exception):
    """Raised by the hook on the last needed module: nothing above it runs."""


class Capture:
    """Forward hooks that copy every (layer, site) of the current batch into a shard buffer.

    ``begin_batch`` points the hooks at rows [row0, row0 + B*C) of the buffers and gives the keep mask
    (not BOS, not padding) for the statistics.
    """

    def __init__(self, blocks: nn.ModuleList, arch: ArchSites, layers, sites, aliases=()) -> None:
        """Hooks every (layer, site) but the ``aliases`` (keys the store holds under another key: the same
        tensor, copied once)."""
        self.handles: list = []
        self.buffers: dict[str, torch.Tensor] = {}
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.row0 = 0
        self.keep: dict[torch.device, torch.Tensor] = {}
        self.devices: set[torch.device] = set()
        for layer in layers:
            for site in sites:
                if acts_key(layer, site) in aliases:
                    continue
                self.handles.append(
                    hook_site(blocks[layer], arch, site, self._hook(acts_key(layer, site)), replace=False)
                )
        # Stop right after the last needed module: resid_pre only needs the last block's input.
        stop_site = "resid_pre" if set(sites) == {"resid_pre"} else "resid_post"
        self.handles.append(hook_site(blocks[layers[-1]], arch, stop_site, self._stop, replace=False))

    def begin_shard(self, buffers: dict[str, torch.Tensor]) -> None:
        self.buffers = buffers
        self.sums = {}

    def begin_batch(self, row0: int, keep_N: torch.Tensor) -> None:
        self.row0 = row0
        self.keep = {keep_N.device: keep_N}

    def _keep_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.keep:
            self.keep[device] = next(iter(self.keep.values())).to(device)
        return self.keep[device]

    def _store(self, key: str, x_BCD: torch.Tensor) -> None:
        if x_BCD.device.type == "cpu":
            # Copies and mat-vecs this small run slower on several OpenMP threads than on one when the cores
            # are busy (barrier spinning; measured 8 ms vs 0.2 ms for a 2048 x 576 copy on a loaded 2-core
            # machine). The thread count is per calling thread, so this leaves the model's matmuls alone.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._copy_and_sum(key, x_BCD)
            finally:
                torch.set_num_threads(threads)
        else:
            self._copy_and_sum(key, x_BCD)

    def _copy_and_sum(self, key: str, x_BCD: torch.Tensor) -> None:
        x_ND = x_BCD.reshape(-1, x_BCD.shape[-1])
        n = x_ND.shape[0]
        dst = self.buffers[key][self.row0 : self.row0 + n]
        if x_ND.device.type == "cpu":
            dst.copy_(x_ND)
        else:
            self.devices.add(x_ND.device)
            dst.copy_(x_ND.to(dst.dtype), non_blocking=True)
        # Statistics on the device, in float32 per batch and float64 across batches (cheap: two mat-vecs).
        x32_ND = x_ND.float()
        keep_N = self._keep_on(x_ND.device)
        s_D = (keep_N @ x32_ND).double()
        sq = ((x32_ND * x32_ND).sum(-1) @ keep_N).double()
        acc = self.sums.get(key)
        if acc is None:
            self.sums[key] = [s_D, sq]
        else:
            acc[0] += s_D
            acc[1] += sq

    def _hook(self, key: str):
        def hook(x: torch.Tensor) -> None:
            self._store(key, x)

        return hook

    @staticmethod
    def _stop(x: torch.Tensor) -> None:
        raise _StopForward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def forward_until_stop(model: nn.Module, ids_BC: torch.Tensor) -> None:
    """Run the model on a batch; the capture's stop hook ends it after the last needed module."""
    try:
        model(input_ids=ids_BC, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the harvest's stop hook never fired; the hooked modules did not run")
