"""Optimisation pieces of the Trainer: optimiser, learning-rate schedule (with linear warm-up) and mixup."""

from __future__ import annotations

import torch

from . import config as _config


def make_optimizer(cfg: _config.TrainConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid names: adamw, sgd")


def lr_factor(epoch: int, cfg: _config.TrainConfig) -> float:
    """Learning-rate factor of epoch index ``epoch`` (0 = the first) with ``warmup_epochs`` = w > 0: linear
    warm-up ``(epoch + 1) / w`` for the first w epochs, then the schedule over the remaining ``epochs − w``
    (cosine: ``½(1 + cos(π·(epoch − w)/(epochs − w)))``, constant: 1)."""
    import math

    w = cfg.warmup_epochs
    if epoch < w:
        return (epoch + 1) / w
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / max(1, cfg.epochs - w)))


def make_scheduler(cfg: _config.TrainConfig, opt):
    if cfg.warmup_epochs:  # reads cfg at every step, so epochs that grow on resume stretch the schedule
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, cfg))
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs), eta_min=0.0)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid names: constant, cosine")


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Mixup (Zhang et al., ICLR 2018) on a time-first batch ``x[T, N, ...]``: λ ~ Beta(α, α) and a random
    pairing ``j`` of the batch, ``x ← λ·x + (1 − λ)·x[:, j]``. Returns ``(x, y, y[j], λ)`` with the labels
    ordered so that λ ≥ ½: ``y`` is the dominant label, which regularisers and the training accuracy use."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    j = torch.randperm(y.shape[0], device=y.device)
    mixed = lam * x + (1.0 - lam) * x[:, j]
    return (mixed, y, y[j], lam) if lam >= 0.5 else (mixed, y[j], y, 1.0 - lam)
