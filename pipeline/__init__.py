"""DiffusionBERT library: data, schedules, losses, the BERT denoiser, samplers and metrics.

Importing this package is cheap and side-effect free: it never imports Ray, MLflow or DVC,
so the library can be used from a notebook, a test or a Ray worker alike.
"""

__version__ = "0.1.0"
