"""Successive halving across a stage's candidates (`stage1.schedule` / `stage2.schedule`).

Rungs are grid points, like folds and repeats: a run's grid parameters carry its `rung`, so the coordinator
claims, retries and resumes rung runs exactly once, with workers and after kill -9.
"""

from __future__ import annotations

# Whether a promoted run continues from its previous rung's checkpoint (else it retrains from epoch 0).
CONTINUES = False
