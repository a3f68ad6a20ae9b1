"""A client's private rounds: epsilon accumulates across rounds and the budget holds."""

import pytest
import torch

from fedrec.client_data import load_client_data
from fedrec.config import load_config
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.model.build import token_table
from fedrec.prepare import prepare
from fedrec.privacy.accounting import AccountantState, epsilon, plan_noise_multiplier
from fedrec.privacy.budget import BudgetExhausted, planned_steps
from tests.conftest import toy_run_config


def setup(tmp_path, **dp):
    overrides = {"dp.enabled": True, "train.batch-size": 2, "train.max-steps": 3, **dp}
    config = load_config(toy_run_config(tmp_path, **overrides))
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    data = load_client_data(config, prepared, 0, 24)
    return config, prepared, model.adapters(), data


def rounds(config, prepared, start, data, count, state=None):
    table = token_table(prepared, config.model)
    outputs = []
    for server_round in range(1, count + 1):
        output = run_local_round(config, data, table, start, server_round, state)
        state = output.privacy.state
        outputs.append(output)
    return outputs


def test_epsilon_accumulates_over_rounds_and_matches_opacus(tmp_path):
    config, prepared, start, data = setup(tmp_path, **{"dp.noise-multiplier": 1.2})
    outputs = rounds(config, prepared, start, data, 3)
    eps = [o.privacy.epsilon for o in outputs]
    assert 0 < eps[0] < eps[1] < eps[2]
    last = outputs[-1].privacy
    assert last.state.rounds == 3 and last.state.steps == 3 * last.steps
    assert last.delta == pytest.approx(1 / (10 * outputs[0].num_examples))
    assert eps[2] == pytest.approx(epsilon(AccountantState("rdp", [(1.2, last.sample_rate, 9)]), last.delta))
    assert any(not torch.equal(outputs[0].adapters[k], start[k]) for k in start)


def test_target_epsilon_is_spent_exactly_by_the_last_round(tmp_path):
    config, prepared, start, data = setup(
        tmp_path, **{"dp.target-epsilon": 2.0, "num-server-rounds": 3}
    )
    outputs = rounds(config, prepared, start, data, 3)
    final = outputs[-1].privacy
    assert final.epsilon == pytest.approx(2.0, rel=0.02) and final.epsilon <= 2.0 * (1 + 1e-6)
    steps = planned_steps(config.train, final.sample_rate)
    assert final.noise_multiplier == pytest.approx(
        plan_noise_multiplier(config.dp, final.sample_rate, steps, 3, final.delta)
    )
    # a fourth round would pass the target: the client refuses before training
    with pytest.raises(BudgetExhausted, match="refusing to train") as refusal:
        run_local_round(config, data, token_table(prepared, config.model), start, 4, final.state)
    assert refusal.value.after > 2.0 and refusal.value.spent == pytest.approx(final.epsilon)


def test_max_epsilon_refuses_the_round_that_would_cross_it(tmp_path):
    config, prepared, start, data = setup(
        tmp_path, **{"dp.noise-multiplier": 1.0, "dp.max-epsilon": 3.0}
    )
    table = token_table(prepared, config.model)
    state, spent = None, []
    with pytest.raises(BudgetExhausted) as refusal:
        for server_round in range(1, 50):
            output = run_local_round(config, data, table, start, server_round, state)
            state = output.privacy.state
            spent.append(output.privacy.epsilon)
    assert spent and max(spent) <= 3.0 < refusal.value.after


def test_a_private_round_after_the_clients_own_evaluation_trains(tmp_path):
    """With fraction-evaluate > 0 one process evaluates (eval mode) and trains the same
    cached model in turn; Opacus refuses a model left in eval mode."""
    from fedrec.local_round import evaluate_local

    config, prepared, start, data = setup(tmp_path, **{"dp.noise-multiplier": 1.2})
    first = run_local_round(config, data, token_table(prepared, config.model), start, 1)
    evaluate_local(config, prepared, data, first.adapters)
    second = run_local_round(config, data, token_table(prepared, config.model), first.adapters, 2, first.privacy.state)
    assert second.privacy.state.rounds == 2 and second.result.steps == first.result.steps
