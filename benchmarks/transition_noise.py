"""What local DP noise does to the transition prior (why ``transitions.*`` is non-private only).

The prior alone (no BERT: each user's scores are their transition prior) on the
validation items, from the exact summed counts and from counts each client noised
as the popularity prior's are: one training example changes at most ``window``
counts by 1 (L2 sensitivity sqrt(window)), so a client releasing its dense counts
with the Gaussian mechanism at noise multiplier ``sigma`` adds N(0, sigma^2 window)
to every entry; the server's sum of K clients carries K times that variance.
Negative sums are clipped to 0. The epsilon printed is the release's alone (RDP,
delta 1e-5), before any DP-SGD: a DP run would pay it on top of training.

    python benchmarks/transition_noise.py [--quick] [--out FILE.json]

Last line: ``exact_valid_hr10=... noised_best_valid_hr10=...``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant

from fedrec.config import FedRecConfig, TransitionConfig
from fedrec.evaluation import evaluate_scorer, histories_for, popularity_scorer
from fedrec.item_transitions import local_transitions, transition_prior
from fedrec.prepare import PreparedData, prepare


def release_epsilon(sigma: float, delta: float = 1e-5) -> float:
    """Epsilon of one Gaussian release at noise multiplier ``sigma``."""
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    return float(accountant.get_epsilon(delta))


def prior_metrics(prepared: PreparedData, counts, window: int) -> dict[str, float]:
    """Validation metrics of the prior alone (the defaults of ``transitions.*`` but ``window``)."""
    prior = transition_prior(counts, TransitionConfig(weight=1.0, window=window))
    scores = prior(histories_for(prepared, "valid")).numpy()
    return evaluate_scorer(lambda users: scores[users], prepared, "valid", 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one window, one noise level")
    parser.add_argument("--out", type=Path, default=Path("transition_noise.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    config = FedRecConfig()  # MovieLens-100K, one user per client
    prepared = prepare(config.data, config.eval)
    rng = np.random.default_rng(0)
    popularity = evaluate_scorer(popularity_scorer(prepared), prepared, "valid", 10)
    rows = [{"counts": "popularity alone", "valid_hr@10": popularity["hr@10"], "valid_ndcg@10": popularity["ndcg@10"]}]
    print(f"popularity alone: valid HR@10 {popularity['hr@10']:.4f} NDCG@10 {popularity['ndcg@10']:.4f}")
    windows = (10,) if args.quick else (1, 5, 10)
    sigmas = (1.0,) if args.quick else (0.5, 1.0, 2.0)
    clients_options = (10,) if args.quick else (10, prepared.num_users)
    best_noised = 0.0
    exact_hr = 0.0
    for window in windows:
        exact = local_transitions(prepared.all_train_items, prepared.num_items, window).toarray()
        found = prior_metrics(prepared, exact, window)
        if window == 10:  # the default window
            exact_hr = found["hr@10"]
        rows.append({"counts": "exact", "window": window, "valid_hr@10": found["hr@10"], "valid_ndcg@10": found["ndcg@10"]})
        print(f"window {window:2d} exact: valid HR@10 {found['hr@10']:.4f} NDCG@10 {found['ndcg@10']:.4f}")
        for sigma in sigmas:
            for clients in clients_options:
                std = sigma * np.sqrt(window) * np.sqrt(clients)
                noised = np.clip(exact + rng.normal(0.0, std, exact.shape), 0.0, None)
                found = prior_metrics(prepared, noised, window)
                best_noised = max(best_noised, found["hr@10"])
                rows.append(
                    {
                        "counts": "noised",
                        "window": window,
                        "sigma": sigma,
                        "release_epsilon": release_epsilon(sigma),
                        "clients": clients,
                        "noise_std_of_sum": std,
                        "valid_hr@10": found["hr@10"],
                        "valid_ndcg@10": found["ndcg@10"],
                    }
                )
                print(
                    f"window {window:2d} sigma {sigma} (release eps {release_epsilon(sigma):.2f}) "
                    f"{clients} clients, std of sum {std:.1f}: valid HR@10 {found['hr@10']:.4f} "
                    f"NDCG@10 {found['ndcg@10']:.4f}"
                )
    args.out.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}, indent=2))
    print(f"exact_valid_hr10={exact_hr:.4f} noised_best_valid_hr10={best_noised:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
