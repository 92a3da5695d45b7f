"""kdpipe: offline two-stage feature knowledge distillation (Cooper et al. 2025)."""

__version__ = "0.1.0"
