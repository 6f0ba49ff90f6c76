"""`cli.py serve`: an upload page and a JSON API around a trained (or sweep-selected) model."""
