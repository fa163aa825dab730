"""The public entry point: load a trained model and generate, complete or infill in three lines.

    from pipeline.api import load
    model = load("models/final")
    model.generate(4)

The implementation lives in `pipeline.generation.api`; this module only names it for users (and
nothing in the library imports it).
"""

from pipeline.generation.api import DiffusionBert, Generation, load

__all__ = ["DiffusionBert", "Generation", "load"]
