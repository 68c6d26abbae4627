"""Optimizers that are not in ``torch.optim``: low-rank gradient projection (GaLore-style) with
randomized or exact SVD and singular-value-thresholded rank choice. Pure torch; see docs/rsvd.md."""

from .projected_adam import ProjectedAdamW, choose_rank, randomized_svd, state_size_formula, top_svd

__all__ = ["ProjectedAdamW", "choose_rank", "randomized_svd", "state_size_formula", "top_svd"]
