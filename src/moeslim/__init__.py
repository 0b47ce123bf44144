"""moeslim: make Mixture-of-Experts language models smaller and faster without retraining."""

__version__ = "0.1.0"
