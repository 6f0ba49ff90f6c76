"""Runs: the run directory and everything that creates or reopens one.

`runs.files` names every file of a run directory (the contract); `runs.cli` is `MedselCLI`, the LightningCLI
that creates run directories for `cli.py fit/validate/test/predict` and every sweep trial; `runs.callbacks`
write the run's side files. Layers: cli.py -> {sweeps, evaluation, serving} -> runs -> {lightning_modules,
datamodules}.
"""
