"""The pieces of the one training loop (sae_cli/trainer.py holds the loop and re-exports the public names):
plan (members, lr and betas, the input scale), schedules, memory (estimate and check), member (a member's state
and its step), rows (metric rows and the Progress events), checkpoint (save and resume), finish (calibrate, fold,
save), signals (Ctrl-C / SIGTERM), errors."""
