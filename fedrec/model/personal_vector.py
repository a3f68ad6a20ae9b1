"""The user embedding a device ranks with: the shared one, made personal on the device.

Two optional terms, both computed after training from the user's own items
against the global model's item embeddings, and never sent:

* a private vector (``personal.enabled``), fitted as below;
* a recency term (``personal.recent-items`` N): ``recent-weight`` times the mean
  embedding of the user's last N items, so items like what they just watched
  rank higher. Since scores are dot products, this adds exactly the item-to-item
  similarity to those items (item-based k-NN) to every score.

**The private vector.** The shared model embeds a user from the text of their
history (the user tower). With ``personal.enabled`` each device then fits a correction ``p`` to that
embedding from its own interactions only, against the global model's item
embeddings, which are frozen:

    user = normalise(u + p),   p = argmin  -sum_{i in H} w_i log  e^{s_i} / (e^{s_i} + sum_{j not in H} e^{s_j})
                                           + l2 * |p|^2,       s_j = (u + p) . item_j / temperature

where H is the user's history (every item they have; the rest of the catalogue
are the negatives) and the weights w_i sum to 1: equal, or with
``personal.half-life`` h, halving every h items back from the most recent one,
so the vector follows what the user watches now more than what they watched
years ago. It is the user side of matrix factorisation on top of the
federated model's item embeddings: a few hundred floats that no other party sees.

Privacy: ``p`` is computed from the user's own records and used only for the
user's own recommendations, so it releases nothing and spends no ε; DP-SGD's
guarantee covers what leaves the device (the adapters). This is the setting of
"joint" differential privacy in DP personalisation (Jain et al., NeurIPS 2021).

Users are independent: every row is optimised with its own loss (summed, not
averaged, over users, and Adam is per coordinate), so a user's vector is the
same whether fitted alone on their device or in a batch of users by a simulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedrec.config import PersonalConfig


def history_weights(histories: Sequence[np.ndarray], num_items: int, half_life: float) -> torch.Tensor:
    """[U, I]: each user's weight on their items, 0 on the rest.

    ``half_life`` 0: every item weighs 1. Otherwise an item ``age`` places before
    the user's last one weighs ``0.5 ** (age / half_life)`` (histories are oldest
    first); an item the user has twice keeps its most recent weight.
    """
    weights = torch.zeros(len(histories), num_items)
    for row, items in enumerate(histories):
        items = torch.as_tensor(np.asarray(items, dtype=np.int64))
        if half_life > 0:
            age = torch.arange(len(items) - 1, -1, -1, dtype=torch.float32)
            weights[row, items] = 0.5 ** (age / half_life)  # a repeated item: the later write wins
        else:
            weights[row, items] = 1.0
    return weights


def fit_personal_vectors(
    users: torch.Tensor,
    items: torch.Tensor,
    histories: Sequence[np.ndarray],
    config: PersonalConfig,
    temperature: float,
) -> torch.Tensor:
    """Unit user embeddings [U, D] with each user's private vector added.

    ``users`` [U, D]: the shared model's user embeddings; ``items`` [I, D]: the
    catalogue's item embeddings (not changed); ``histories``: each user's item
    indices (positives). A user with no history keeps their shared embedding.
    """
    if len(histories) != len(users):
        raise ValueError(f"{len(users)} user embeddings but {len(histories)} histories")
    users, items = users.detach().float(), items.detach().float()
    weights = history_weights(histories, len(items), config.half_life).to(users.device)
    positives = weights > 0
    counts = positives.sum(1)
    offsets = torch.zeros_like(users, requires_grad=True)
    optimizer = torch.optim.Adam([offsets], lr=config.lr)
    # a fit of its own: gradients on even under no_grad, float32 even under autocast
    with torch.enable_grad(), torch.autocast(users.device.type, enabled=False):
        for _ in range(config.steps):
            logits = (users + offsets) @ items.T / temperature
            # a finite fill keeps a user who has every item free of NaN (no negatives: no loss)
            negatives = torch.logsumexp(logits.masked_fill(positives, -1e9), dim=1, keepdim=True)
            log_p = logits - torch.logaddexp(logits, negatives)
            nll = -(log_p * weights).sum(1) / weights.sum(1).clamp(min=1e-12)
            loss = (nll + config.l2 * offsets.pow(2).sum(1)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    fitted = users + offsets.detach() * (counts > 0).unsqueeze(1)
    return torch.nn.functional.normalize(fitted, dim=1)


def recent_items_mean(items: torch.Tensor, histories: Sequence[np.ndarray], count: int) -> torch.Tensor:
    """[U, D]: the mean embedding of each user's last ``count`` items (zero without history)."""
    rows = [
        items[torch.as_tensor(np.asarray(h, dtype=np.int64)[-count:])].float().mean(0)
        if len(h)
        else items.new_zeros(items.shape[1]).float()
        for h in histories
    ]
    return torch.stack(rows) if rows else items.new_zeros(0, items.shape[1]).float()


def personalise(
    users: torch.Tensor,
    items: torch.Tensor,
    histories: Sequence[np.ndarray],
    config: PersonalConfig,
    temperature: float,
) -> torch.Tensor:
    """Unit user embeddings [U, D] with the terms ``config`` turns on (none: unchanged).

    ``histories``: each user's item indices, oldest first (the recency term takes
    the last ones).
    """
    if config.enabled:
        users = fit_personal_vectors(users, items, histories, config, temperature)
    if config.recent_items:
        recent = recent_items_mean(items, histories, config.recent_items).to(users.device)
        users = users.float() + config.recent_weight * recent
    return torch.nn.functional.normalize(users.float(), dim=1)
