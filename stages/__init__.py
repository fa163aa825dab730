"""Thin entry points, one per DVC stage, and the typer CLI."""
