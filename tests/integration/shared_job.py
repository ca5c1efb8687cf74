"""The config of the job that tests/integration/conftest.py runs once per session."""

from __future__ import annotations


def job_config(corpus_dir, tasks_dir, checkpoints, output, **overrides) -> dict:
    """The shared job's config as plain data; ``overrides`` maps "section.key" to a value."""
    data = {
        "corpus": {"uris": [str(corpus_dir)], "max_samples": 240, "sample_seed": 0},
        "checkpoints": {"uris": [str(checkpoints)]},
        "tasks": {"root": str(tasks_dir), "max_influence_examples": 16},
        "evaluation": {"metric": "gold_nll", "batch_size": 16},
        "influence": {"keep_layers": 0.5, "batch_size": 16},
        "mixture": {"top_k_percent": 40.0, "beta": 1.0, "token_budget": 20_000},
        "output": {"uri": str(output)},
        # One wave: waves only matter for resuming, which tests/integration/test_refresh.py covers.
        "ray": {"shards_per_wave": 10_000},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    return data
