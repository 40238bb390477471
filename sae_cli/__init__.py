"""sae_cli: sparse autoencoders of every variant, trained by one loop from an actcache store."""

__version__ = "0.1.0"
