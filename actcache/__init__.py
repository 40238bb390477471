"""actcache: harvest language-model activations into a compressed, crash-safe zarr v3 store."""

__version__ = "0.1.0"
