"""ExitEnv: every reward case of METHOD §3 pinned on hand-made rows, transitions, metrics, env checker."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from greencode.config import RewardConfig
from greencode.env import ExitEnv, observation_stats, shard_paths_for_worker, step_reward
from greencode.extraction import optimal_exit
from greencode.policy import CONTINUE, EXIT
from greencode.scoring import fixed_exit_accuracy, pareto_front, score_exits
from greencode.shards import ShardMeta, build_table, load_shards, write_shard

REWARD = {"alpha": 0.25, "beta": 0.5, "gamma": 0.5, "epsilon": 0.1}
META = ShardMeta(exit_points=[2, 4, 6], hidden_size=4, num_layers=8, model_fingerprint="toy")


def rows_for(sample_id, tokens):
    """tokens: list of (exit_predictions, final_token); hidden encodes (token, exit) for checking observations."""
    rows = []
    for t, (preds, final) in enumerate(tokens):
        hidden = np.array([[t, e, 0, 0] for e in range(len(preds))], dtype=float)
        rows.append({"sample_id": sample_id, "token_index": t, "hidden": hidden, "exit_predictions": preds,
                     "final_token": final, "dataset_token": final, "optimal_exit": optimal_exit(preds, final)})
    return rows


@pytest.fixture
def one_sample(tmp_path):
    # token 0: optimum at exit index 1 (layer 4); token 1: no exit matches -> optimum = final layer (index 3)
    rows = rows_for("s0", [([5, 7, 7], 7), ([1, 2, 3], 9)])
    return write_shard(build_table(META, rows), tmp_path / "shard-00000.parquet")


@pytest.mark.parametrize(
    "action, current, optimal, correct, expected",
    [
        (EXIT, 1, 1, True, 1.0),  # right exit at the optimum
        (EXIT, 3, 1, True, -0.25 * 2 / 4),  # right but too late: -alpha * steps / n
        (EXIT, 0, 3, False, -0.5 * 3 / 4),  # too early: -beta * steps / n
        (EXIT, 2, 1, False, -0.1),  # wrong at/after the optimum: -epsilon
        (CONTINUE, 0, 2, False, 1.0),  # continuing before the optimum
        (CONTINUE, 2, 2, True, -0.5 * 1 / 4),  # continuing past it: -gamma * (next - opt) / n
        (CONTINUE, 3, 0, False, -0.5 * 4 / 4),  # the largest penalty is exactly -gamma
    ],
)
def test_reward_table(action, current, optimal, correct, expected):
    assert step_reward(action, current, optimal, correct, 4, RewardConfig(**REWARD)) == pytest.approx(expected)


def test_penalties_stay_in_minus_one_zero():
    worst = RewardConfig(alpha=1, beta=1, gamma=1, epsilon=1)
    n = 5
    values = [step_reward(a, c, o, k, n, worst)
              for a in (0, 1) for c in range(n) for o in range(n + 1) for k in (True, False)]
    assert min(values) >= -1.0 and max(values) == 1.0


def test_episode_transitions_and_metrics(one_sample):
    env = ExitEnv({"shard_paths": [str(one_sample)], "reward": REWARD})
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs[:2].tolist() == [0, 0]
    obs, r, term, trunc, _ = env.step(CONTINUE)  # token 0, exit 0 < opt 1
    assert (r, term, obs[:2].tolist()) == (1.0, False, [0, 1])
    obs, r, term, _, _ = env.step(EXIT)  # right at the optimum; next token, first exit point
    assert (r, term, obs[:2].tolist()) == (1.0, False, [1, 0])
    obs, r, term, trunc, info = env.step(EXIT)  # token 1 exits at 0, optimum is final (index 3): too early
    assert r == pytest.approx(-0.5 * 3 / 3) and term and not trunc
    assert info == {"exit_accuracy": 0.5, "mean_exit_layer": 3.0, "mean_optimal_layer": 6.0}


def test_continuing_past_the_last_exit_finishes_at_the_final_layer(one_sample):
    env = ExitEnv({"shard_paths": [str(one_sample)], "reward": REWARD})
    env.reset(seed=1)
    rewards = [env.step(a)[1] for a in (CONTINUE, CONTINUE, EXIT)]  # token 0: 1, past opt, late exit
    assert rewards == pytest.approx([1.0, -0.5 * 1 / 3, -0.25 * 1 / 3])
    steps = [env.step(CONTINUE) for _ in range(3)]  # token 1: all the way to the final layer
    assert [s[1] for s in steps] == [1.0, 1.0, 1.0]
    assert [s[2] for s in steps] == [False, False, True]
    assert steps[-1][4] == {"exit_accuracy": 1.0, "mean_exit_layer": 7.0, "mean_optimal_layer": 6.0}


def test_wrong_exit_after_optimum_costs_epsilon(tmp_path):
    path = write_shard(build_table(META, rows_for("s", [([7, 3, 7], 7)])), tmp_path / "shard-00000.parquet")
    env = ExitEnv({"shard_paths": [str(path)], "reward": REWARD})
    env.reset(seed=0)
    env.step(CONTINUE)
    assert env.step(EXIT)[1] == pytest.approx(-0.1)


def test_passes_gymnasium_env_checker(tmp_path, one_sample):
    write_shard(build_table(META, rows_for("s1", [([7, 7, 7], 7)] * 3)), tmp_path / "shard-00001.parquet")
    env = ExitEnv({"shards_dir": str(tmp_path), "reward": REWARD})
    assert len(env.episodes) == 2
    check_env(env, skip_render_check=True)


def test_bad_config_is_named(one_sample):
    with pytest.raises(ValueError, match="shard_paths"):
        ExitEnv({})
    with pytest.raises(ValueError, match="alpha must be <= beta"):
        ExitEnv({"shard_paths": [str(one_sample)], "reward": {"alpha": 0.9, "beta": 0.1}})


def test_each_runner_reads_its_own_shards():
    paths = [f"shard-{i}" for i in range(5)]
    assert shard_paths_for_worker(paths, 1, 2) == ["shard-0", "shard-2", "shard-4"]
    assert shard_paths_for_worker(paths, 2, 2) == ["shard-1", "shard-3"]
    assert shard_paths_for_worker(paths, 0, 2) == paths  # local runner
    assert shard_paths_for_worker(paths[:1], 2, 2) == paths[:1]  # too few shards: share


def test_score_exits_against_fixed_exits(one_sample):
    data = load_shards([one_sample])
    assert fixed_exit_accuracy(data).tolist() == [0.0, 0.5, 0.5, 1.0]
    always_exit = score_exits(data, lambda h: np.tile([0.0, 5.0], (len(h), 1)))
    assert (always_exit.exit_accuracy, always_exit.mean_exit_layer) == (0.0, 2.0)
    oracle = score_exits(data, lambda h: np.where((h[:, :1] == 0) & (h[:, 1:2] == 1), [0.0, 5.0], [5.0, 0.0]))
    assert oracle.exit_accuracy == 1.0 and oracle.mean_exit_layer == 6.0  # layer 4 and the final 8
    assert oracle.fixed_same_depth_accuracy == 0.5 and oracle.advantage == 0.5


def test_standardised_observations(one_sample):
    data = load_shards([one_sample])
    mean, std = observation_stats(data)
    env = ExitEnv({"shard_paths": [str(one_sample)], "obs_mean": mean.tolist(), "obs_std": std.tolist()})
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs, (data.hidden[0, 0] - mean) / std, rtol=1e-6)
    with pytest.raises(ValueError, match="obs_mean/obs_std must be 4 values"):
        ExitEnv({"shard_paths": [str(one_sample)], "obs_mean": [0.0], "obs_std": [1.0]})


def test_pareto_front_keeps_only_undominated_points():
    accuracy = np.array([0.9, 0.8, 0.8, 0.7, 0.95])
    layers = np.array([20.0, 15.0, 18.0, 15.0, 26.0])
    # (0.8, 18) is beaten by (0.8, 15); (0.7, 15) by (0.8, 15); the others trade accuracy for layers
    assert pareto_front(accuracy, layers).tolist() == [True, True, False, False, True]
