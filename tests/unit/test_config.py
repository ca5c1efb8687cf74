"""Config loading and validation: bad keys and values fail before any work, naming key and value."""

import pytest
import yaml

from automixer_ray.config import (
    ConfigError,
    JobConfig,
    config_from_dict,
    load_config,
    save_resolved_config,
    with_overrides,
)


def test_defaults_are_valid():
    config = config_from_dict({})
    assert config.evaluation.metric == "gold_nll"
    assert config.influence.metric == "cosine"
    assert config.mixture.group_by == "checkpoint"


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "corpus": {"uris": ["data/corpus"], "max_samples": 100},
        "mixture": {"top_k_percent": 25, "beta": 0.5, "token_budget": 1000},
        "influence": {"keep_layers": 4},
    }))
    config = load_config(str(path))
    assert config.corpus.uris == ["data/corpus"]
    assert config.mixture.top_k_percent == 25.0
    assert isinstance(config.mixture.top_k_percent, float)
    assert config.influence.keep_layers == 4


@pytest.mark.parametrize("data, fragments", [
    ({"corpus": {"uri": ["x"]}}, ["corpus.uri", "allowed under corpus", "uris"]),
    ({"colour": 1}, ["colour", "allowed under the top level"]),
    ({"mixture": {"top_k_percent": 0}}, ["mixture.top_k_percent=0", "(0.0, 100.0]"]),
    ({"mixture": {"top_k_percent": 150}}, ["mixture.top_k_percent=150"]),
    ({"mixture": {"beta": -1}}, ["mixture.beta=-1"]),
    ({"mixture": {"token_budget": 0}}, ["mixture.token_budget=0"]),
    ({"mixture": {"beta": "high"}}, ["mixture.beta='high'", "wrong type"]),
    ({"evaluation": {"metric": "f1"}}, ["evaluation.metric='f1'", "'gold_nll'"]),
    ({"influence": {"keep_layers": 0}}, ["influence.keep_layers=0"]),
    ({"influence": {"keep_layers": 1.5}}, ["influence.keep_layers=1.5"]),
    ({"influence": {"keep_layers": True}}, ["influence.keep_layers"]),
    ({"tasks": {"names": ["boolq", "boolq"]}}, ["tasks.names", "boolq"]),
    ({"tasks": {"influence_fraction": 0}}, ["tasks.influence_fraction=0"]),
    ({"projection": {"k_in": 0}}, ["projection.k_in=0"]),
    ({"corpus": {"max_samples": "ten"}}, ["corpus.max_samples='ten'"]),
    ({"corpus": {"decode_errors": "ignore"}}, ["corpus.decode_errors='ignore'", "'replace'"]),
    ({"ray": {"actors_per_checkpoint": 0}}, ["ray.actors_per_checkpoint=0"]),
    ({"output": "runs/x"}, ["output must be a mapping"]),
])
def test_invalid_config_names_key_and_value(data, fragments):
    with pytest.raises(ConfigError) as error:
        config_from_dict(data)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_missing_inputs_fail_before_work():
    with pytest.raises(ConfigError, match="corpus.uris is empty"):
        JobConfig().validate_inputs()


def test_fingerprint_tracks_content():
    first = config_from_dict({"mixture": {"beta": 1.0}})
    same = config_from_dict({"mixture": {"beta": 1}})
    other = config_from_dict({"mixture": {"beta": 2.0}})
    assert first.fingerprint() == same.fingerprint()
    assert first.fingerprint() != other.fingerprint()


def test_overrides_revalidate():
    config = with_overrides(JobConfig(), {"corpus.uris": ["a", "b"], "output.uri": None})
    assert config.corpus.uris == ["a", "b"]
    assert config.output.uri == JobConfig().output.uri
    with pytest.raises(ConfigError, match="corpus.max_samples=0"):
        with_overrides(config, {"corpus.max_samples": 0})


def test_resolved_config_saved_with_fingerprint(tmp_path):
    config = config_from_dict({"corpus": {"uris": ["c"]}})
    save_resolved_config(config, str(tmp_path / "job.yaml"))
    saved = yaml.safe_load((tmp_path / "job.yaml").read_text())
    assert saved["fingerprint"] == config.fingerprint()
    assert config_from_dict(saved["config"]).fingerprint() == config.fingerprint()


def test_bad_yaml_file_is_reported(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_key_documented():
    """docs/CONFIG.md lists every config key, so a new key cannot ship undocumented."""
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text()
    for section in dataclasses.fields(JobConfig):
        for key in dataclasses.fields(section.type if isinstance(section.type, type) else section.default_factory):
            assert f"{key.name}:" in text, f"{section.name}.{key.name}"


def test_fingerprint_ignores_runtime_settings():
    base = config_from_dict({"corpus": {"uris": ["c"]}})
    runtime = config_from_dict({"corpus": {"uris": ["c"]}, "ray": {"actors_per_checkpoint": 3},
                                "output": {"overwrite": True}, "simulation": {"seeds": [5]}})
    assert base.fingerprint() == runtime.fingerprint()
