"""The global model as the server (or a central baseline) sees it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedrec.checkpoint import save_checkpoint
from fedrec.config import FedRecConfig
from fedrec.errors import check_setting
from fedrec.evaluation import evaluate_scorer, histories_for, model_scorer
from fedrec.item_transitions import TransitionPrior
from fedrec.model.adapters import adapter_state, load_adapter_state, state_bytes
from fedrec.model.build import build_recommender, token_table
from fedrec.model.item_identity import zero_identities
from fedrec.prepare import PreparedData
from fedrec.runtime import autocast, select_device


class GlobalModel:
    """Builds the recommender once; evaluates and checkpoints given adapters."""

    def __init__(self, config: FedRecConfig, prepared: PreparedData) -> None:
        self.config = config
        self.prepared = prepared
        self.device = select_device(config.runtime)
        self.model = build_recommender(config.model, config.lora, prepared.num_items).to(self.device)
        self.table = token_table(prepared, config.model)
        self.item_prior: torch.Tensor | None = None
        """Added to every score (the popularity prior, :mod:`fedrec.item_counts`)."""
        self.user_prior: TransitionPrior | None = None
        """Added to each user's scores from their history (:mod:`fedrec.item_transitions`)."""

    def adapters(self) -> OrderedDict[str, torch.Tensor]:
        """The current adapter state dict."""
        return adapter_state(self.model.encoder)

    def set_adapters(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model.encoder, state)

    def size_report(self) -> dict[str, int]:
        """Bytes of the adapters (what travels) against the whole model."""
        params = list(self.model.parameters())
        return {
            "adapter_bytes": state_bytes(self.adapters()),
            "model_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params),
        }

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Sampled and full-ranking metrics of the current adapters (and ``*_cold``
        ones on the items held out of training, with ``eval.cold-items``).

        Items that join the catalogue after training (``eval.cold-items-join``) are
        evaluated as new items: their identity vectors are set to zero first."""
        check_setting(
            split != "valid" or not self.config.train.include_valid_item,
            "train.include-valid-item",
            "the model has trained on the validation items, so it cannot be evaluated "
            "on them; evaluate --split test, or train with it off to choose settings",
        )
        unlisted = self.prepared.unlisted_in_training(self.config.eval)
        if unlisted and self.model.item_identity is not None:
            zero_identities(self.model.item_identity, sorted(unlisted))
        with autocast(self.config.runtime, self.device):
            scorer = model_scorer(
                self.model,
                self.table,
                histories_for(self.prepared, split),
                self.config.model.history_items,
                self.config.model.max_user_tokens,
                self.device,
                self.config.personal,
                self.item_prior,
                self.user_prior,
            )
            metrics = evaluate_scorer(
                scorer, self.prepared, split, self.config.eval.k, self.config.eval.max_users, beyond=True
            )
            if split == "test" and self.prepared.has_cold_test:
                cold = evaluate_scorer(scorer, self.prepared, "cold", self.config.eval.k)
                metrics.update({f"{name}_cold": value for name, value in cold.items()})
            return metrics

    def checkpoint(
        self, out_dir: Path, server_round: int, server_state: Mapping[str, np.ndarray] | None = None
    ) -> Path:
        """Save the global adapters of ``server_round``, with the server optimizer's state."""
        return save_checkpoint(self.model.encoder, out_dir, server_round, server_state=server_state)
