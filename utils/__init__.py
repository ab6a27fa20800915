"""Shared helpers, one concern a module: `errors` (user mistakes), `io` (checkpoints, atomic files,
logs), `distributed` (devices and torchrun)."""
