"""A client's privacy budget: the steps a round takes, its noise, and refusal."""

from __future__ import annotations

from collections.abc import Sequence

from fedrec.config import TrainConfig
from fedrec.privacy.accounting import (
    AccountantState,
    HistoryEntry,
    epsilon,
    plan_noise_multiplier,
    would_exceed,
)
from fedrec.privacy.config import PrivacyConfig


class BudgetExhausted(RuntimeError):
    """Training this round would take the client past its privacy budget."""

    def __init__(self, spent: float, after: float, budget: float, delta: float) -> None:
        super().__init__(
            f"privacy budget exhausted: epsilon spent {spent:.4f}, this round would make it "
            f"{after:.4f} > budget {budget:.4f} (delta {delta:.3g}); refusing to train"
        )
        self.spent = spent
        self.after = after
        self.budget = budget
        self.delta = delta


def poisson_batches_per_epoch(sample_rate: float) -> int:
    """Batches Opacus' Poisson loader yields per epoch (its own expression)."""
    return int(1 / sample_rate)


def planned_steps(train: TrainConfig, sample_rate: float) -> int:
    """DP-SGD steps of one local round: every epoch's batches, capped by max-steps.

    Empty Poisson batches are noise-only steps (see ``fedrec.training``), so a
    round always takes exactly this many steps, and the accountant counts them all.
    """
    steps = train.local_epochs * poisson_batches_per_epoch(sample_rate)
    return min(steps, train.max_steps) if train.max_steps else steps


def noise_for(
    config: PrivacyConfig,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    spent: Sequence[HistoryEntry] = (),
) -> float:
    """``dp.noise-multiplier``, or the one that spends ``dp.target-epsilon`` in ``rounds``
    after the releases ``spent`` (the noised item counts).

    The plan assumes the client trains in every round; a client sampled less
    often spends less than the target.
    """
    if config.target_epsilon > 0:
        return plan_noise_multiplier(config, sample_rate, steps_per_round, rounds, delta, spent)
    return config.noise_multiplier


def check_budget(
    state: AccountantState,
    config: PrivacyConfig,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> float:
    """The epsilon after ``steps`` more steps; raises :class:`BudgetExhausted` instead
    when they would take the client past its budget (``state`` is not changed)."""
    exceeds, after = would_exceed(state, config, delta, noise_multiplier, sample_rate, steps)
    if exceeds:
        raise BudgetExhausted(epsilon(state, delta), after, config.budget, delta)
    return after
