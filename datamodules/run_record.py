"""The files the data layer writes into a run directory: what data the run saw.

They belong to the run directory's contract (`runs.files`, which re-exports these names), but are written
here, below `runs` in the layers, so the names are defined here once and imported from here by `runs`.
"""

SPLIT = "split.json"  # the split file's path, seed, ratios, hash (and the fold, under cross-validation)
SPLIT_COUNTS = "split_counts.csv"  # images per class in each split
SKIPPED = "skipped_images.csv"  # unusable inputs dropped under data.on_bad_image: skip
AUDIT = "audit.json"  # the duplicate audit's counts and what data.on_conflict did
AUDIT_CLUSTERS = "audit_clusters.parquet"  # its duplicate clusters and their categories
