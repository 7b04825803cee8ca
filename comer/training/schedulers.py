"""Per-iteration learning-rate schedules with linear warm-up, matching mmcv's LrUpdaterHook formulas.

The value used at (0-based) iteration ``it`` for a group whose base lr is ``base``:
  poly:  regular = (base - min_lr) * (1 - it / max_iters) ** power + min_lr
  step:  regular = max(base * gamma ** (number of milestones <= it), min_lr)
  warm-up (it < warmup_iters):  k = (1 - it / warmup_iters) * (1 - warmup_ratio);  lr = regular * (1 - k)

They are ``LambdaLR``s stepped once per optimizer step (Lightning ``interval: "step"``): the lr at
construction is the value for iteration 0, after n scheduler steps the value for iteration n.
Factories take ``(optimizer, max_iters)`` so a Hydra ``_partial_`` config leaves ``max_iters`` to the
trainer (the module passes ``trainer.estimated_stepping_batches``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_factor(it: int, warmup_iters: int, warmup_ratio: float) -> float:
    """Multiplier on the regular lr during linear warm-up (1.0 once warm-up is over)."""
    if it >= warmup_iters:
        return 1.0
    k = (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return 1.0 - k


def poly_lr(it: int, base_lr: float, max_iters: int, power: float, min_lr: float) -> float:
    it = min(it, max_iters)
    return (base_lr - min_lr) * (1.0 - it / max_iters) ** power + min_lr


def step_lr(it: int, base_lr: float, milestones: Sequence[int], gamma: float, min_lr: float) -> float:
    passed = sum(1 for m in milestones if it >= m)
    return max(base_lr * gamma ** passed, min_lr)


def _check_warmup(warmup_iters: int, warmup_ratio: float) -> None:
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters={warmup_iters} must be >= 0")
    if not 0.0 < warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio} must be in (0, 1]")


def _check_max_iters(max_iters) -> int:
    if max_iters is None or max_iters == float("inf") or int(max_iters) < 1:
        raise ValueError(f"max_iters={max_iters}: the schedule needs a finite number of iterations >= 1 "
                         f"(set trainer.max_steps)")
    return int(max_iters)


def _lambda_lr(optimizer: Optimizer, regular: Callable[[int, float], float], warmup_iters: int,
               warmup_ratio: float) -> LambdaLR:
    """One lambda per group: LambdaLR multiplies each group's initial lr by lambda(it)."""
    lambdas = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        if base <= 0.0:
            raise ValueError(f"param group {group.get('name', '?')!r} has lr={base}; the schedule needs lr > 0")
        lambdas.append(lambda it, base=base: regular(it, base) / base
                       * linear_warmup_factor(it, warmup_iters, warmup_ratio))
    return LambdaLR(optimizer, lambdas)


def poly_warmup_scheduler(optimizer: Optimizer, max_iters: int, power: float = 1.0, min_lr: float = 0.0,
                          warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> LambdaLR:
    """mmcv ``policy='poly'`` with ``warmup='linear'``, by iteration."""
    max_iters = _check_max_iters(max_iters)
    _check_warmup(warmup_iters, warmup_ratio)
    if power <= 0.0 or min_lr < 0.0:
        raise ValueError(f"power={power} must be > 0 and min_lr={min_lr} >= 0")
    return _lambda_lr(optimizer, lambda it, base: poly_lr(it, base, max_iters, power, min_lr),
                      warmup_iters, warmup_ratio)


def step_warmup_scheduler(optimizer: Optimizer, max_iters: int, milestones: Sequence[int], gamma: float = 0.1,
                          min_lr: float = 0.0, warmup_iters: int = 0, warmup_ratio: float = 1e-3) -> LambdaLR:
    """mmcv ``policy='step'`` with ``warmup='linear'``; milestones are in iterations
    (an epoch recipe's step at epoch e is ``e * iterations_per_epoch``)."""
    max_iters = _check_max_iters(max_iters)
    _check_warmup(warmup_iters, warmup_ratio)
    milestones = [int(m) for m in milestones]
    if milestones != sorted(milestones) or any(m <= 0 or m >= max_iters for m in milestones):
        raise ValueError(f"milestones={milestones} must be increasing iterations in (0, max_iters={max_iters})")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must be in (0, 1]")
    return _lambda_lr(optimizer, lambda it, base: step_lr(it, base, milestones, gamma, min_lr),
                      warmup_iters, warmup_ratio)
