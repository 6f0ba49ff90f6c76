"""Serving a trained model: the FastAPI upload page and JSON API behind `cli.py serve`."""
