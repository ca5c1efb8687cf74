"""Simulation config checks, the eval split guard, the influence-table fingerprint and the report maths."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from automixer_ray.config import ConfigError, SimulationConfig, TasksConfig, config_from_dict
from automixer_ray.simulation import candidate_name, eval_splits, table_fingerprint
from automixer_ray.simulation_report import (
    AVERAGE,
    choose_candidate,
    compare,
    markdown_table,
    summarize,
)
from automixer_ray.tasks import prepare_task_splits


@pytest.mark.parametrize("overrides, message", [
    ({"top_k_percents": [0.0]}, "top_k_percents"),
    ({"top_k_percents": [25.0, 25.0]}, "more than once"),
    ({"betas": [-1.0]}, "betas"),
    ({"seeds": []}, "seeds is empty"),
    ({"baselines": ["source_proportional"]}, "lacks 'uniform'"),
    ({"baselines": ["uniform", "domain"]}, "baselines"),
    ({"hidden_size": 30, "num_heads": 4}, "not divisible"),
    ({"token_budget": 100}, "less than one step"),
    ({"max_eval_examples": 0}, "max_eval_examples"),
])
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**overrides)


def test_config_loads_from_mapping():
    config = config_from_dict({"simulation": {"top_k_percents": [10, 30], "seeds": [3], "token_budget": 4096,
                                              "batch_size": 4, "context_length": 64}})
    assert config.simulation.top_k_percents == [10.0, 30.0]
    assert config.simulation.steps == 16
    assert config.to_dict()["simulation"]["seeds"] == [3]


def test_candidate_names_are_distinct_and_safe():
    names = {candidate_name(k, b) for k in (10.0, 12.5, 50.0) for b in (0.0, 0.5, 2.0)}
    assert len(names) == 9
    assert candidate_name(12.5, 0.5) == "automixer_k12.5_b0.5"
    assert all("/" not in name for name in names)


def test_eval_split_disjoint_from_influence(shared_data):
    tasks = TasksConfig(root=str(shared_data / "tasks"), names=["arc_easy", "boolq"], max_influence_examples=32)
    examples, influence_ids = eval_splits(tasks, max_examples=50)
    splits = prepare_task_splits(tasks)
    for task in ("arc_easy", "boolq"):
        eval_ids = {example.example_id for example in examples[task]}
        assert len(eval_ids) == 50
        assert not eval_ids & influence_ids[task]
        # Every eval example comes from E_t, never from the uncapped influence split.
        assert eval_ids <= {example.example_id for example in splits.eval[task]}


def test_table_fingerprint_follows_content(tmp_path):
    folder = tmp_path / "influence"
    folder.mkdir()
    pq.write_table(pa.table({"sample_id": ["a", "b"], "score": [0.5, 0.25]}), folder / "part-0.parquet")
    first = table_fingerprint(str(folder))
    assert table_fingerprint(str(folder)) == first
    pq.write_table(pa.table({"sample_id": ["a", "b"], "score": [0.5, 0.75]}), folder / "part-0.parquet")
    assert table_fingerprint(str(folder)) != first


def _results(values: dict[str, list[list[float]]], metric: str = "acc") -> pd.DataFrame:
    """Build result rows at step 10 from {candidate: [[task values] per seed]}."""
    rows = []
    for candidate, seeds in values.items():
        for seed, per_task in enumerate(seeds):
            for task, value in zip(("arc_easy", "piqa"), per_task):
                rows.append({"candidate": candidate, "seed": seed, "step": 10, "task": task, "metric": metric,
                             "value": value})
                rows.append({"candidate": candidate, "seed": seed, "step": 5, "task": task, "metric": metric,
                             "value": 0.0})
    return pd.DataFrame(rows)


def test_summary_uses_last_step_and_averages_per_seed():
    results = _results({"uniform": [[0.2, 0.4], [0.4, 0.6]]})
    summary = summarize(results, "acc").set_index(["candidate", "task"])
    assert summary.loc[("uniform", "arc_easy"), "mean"] == pytest.approx(0.3)
    assert summary.loc[("uniform", AVERAGE), "mean"] == pytest.approx(0.4)
    # Per-seed averages are 0.3 and 0.5, so the sample std is sqrt(0.02).
    assert summary.loc[("uniform", AVERAGE), "std"] == pytest.approx(math.sqrt(0.02))
    assert summary.loc[("uniform", AVERAGE), "n_seeds"] == 2


@pytest.mark.parametrize("mean, std, base_mean, base_std, lower, verdict", [
    (0.50, 0.02, 0.45, 0.01, False, "better"),
    (0.46, 0.02, 0.45, 0.01, False, "no difference"),
    (0.40, 0.01, 0.45, 0.03, False, "worse"),
    (3.10, 0.05, 3.30, 0.05, True, "better"),
    (3.10, float("nan"), 3.10, float("nan"), True, "no difference"),
])
def test_compare_against_seed_spread(mean, std, base_mean, base_std, lower, verdict):
    assert compare(mean, std, base_mean, base_std, lower_is_better=lower) == verdict


def test_choice_respects_metric_direction():
    results = pd.concat([
        _results({"uniform": [[0.3, 0.3], [0.3, 0.3]], "automixer_k25_b1": [[0.5, 0.5], [0.5, 0.5]]}, "acc"),
        _results({"uniform": [[3.0, 3.0], [3.0, 3.0]], "automixer_k25_b1": [[3.5, 3.5], [3.5, 3.5]]}, "gold_nll"),
    ])
    assert choose_candidate(summarize(results, "acc"), "acc") == "automixer_k25_b1"
    assert choose_candidate(summarize(results, "gold_nll"), "gold_nll") == "uniform"


def test_markdown_table_marks_small_differences():
    results = _results({"uniform": [[0.30, 0.30], [0.40, 0.40]], "automixer_k25_b1": [[0.31, 0.31], [0.41, 0.41]],
                        "automixer_k50_b1": [[0.90, 0.90], [0.91, 0.91]]})
    summary = summarize(results, "acc")
    table = markdown_table(summary, "acc", chosen="automixer_k50_b1")
    lines = {line.split(" | ")[0].strip("| *"): line for line in table.splitlines()[2:]}
    assert lines["automixer_k25_b1"].endswith("no difference |")
    assert lines["automixer_k50_b1"].endswith("better |")
    assert lines["uniform"].endswith("baseline |")
    assert "**automixer_k50_b1**" in table


def test_long_continuations_are_dropped(shared_data, tokenizer_dir):
    from automixer_ray.evaluation import encode_pair
    from automixer_ray.simulation import drop_unscorable
    from transformers import AutoTokenizer

    tasks = TasksConfig(root=str(shared_data / "tasks"), names=["piqa"], max_influence_examples=8)
    examples, _ = eval_splits(tasks, max_examples=40)
    kept = drop_unscorable(examples, tokenizer_dir, context_length=16)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert 0 < len(kept["piqa"]) < len(examples["piqa"])
    for example in kept["piqa"]:
        for i, choice in enumerate(example.choices):
            assert len(encode_pair(tokenizer, example.context_for(i), choice)[1]) <= 16
