"""The data audit: duplicate/leakage report, label-issue detection and `cli.py audit`.

Duplicate detection itself runs in the data layer (`datamodules.duplicates`, `datamodules.duplicate_audit`)
because every `fit` and `sweep` needs its clusters for the split; this package turns the results into a
report (`audit.report`), finds suspected label errors (`audit.label_issues`) and is the `audit` command
(`audit.cli.main`).
"""
