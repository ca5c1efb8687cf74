"""Typed job configuration: one kw-only dataclass per component, checked in ``__post_init__``.

A config is loaded from YAML with ``yaml.safe_load`` (a local path or any fsspec URI) and every
key is checked before any work starts. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import fsspec
import yaml

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """An invalid job configuration, raised before any work starts."""


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}")


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {left}{lo}, {hi}]")


@dataclass(kw_only=True)
class CorpusConfig:
    """Raw corpus: files, folders or globs as fsspec URIs, and how to read records from them."""

    uris: list[str] = field(default_factory=list)
    # "auto" picks the reader from each file's extension (.jsonl[.gz|.zst], .parquet, .txt).
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    # A record field that names the source; None uses the name of the file's parent folder.
    source_field: Optional[str] = None
    # Tokens per sample; longer documents are cut into chunks. None uses the model's context size.
    chunk_num_tokens: Optional[int] = None
    # Keep at most this many samples, drawn by a seeded hash of the sample id. None keeps all.
    # Finding the threshold takes one extra pass over the corpus, and it moves as the corpus grows.
    max_samples: Optional[int] = None
    # Keep each sample with this probability, by the same seeded hash: a per-shard decision that
    # stays the same as the corpus grows, so refreshes rescore only new shards. None keeps all.
    sample_fraction: Optional[float] = None
    sample_seed: int = 0
    # Undecodable UTF-8 bytes: "replace" them (counted) or "skip" the record (counted).
    decode_errors: Literal["replace", "skip"] = "replace"
    # Samples with the same content hash: "keep" every copy or "drop" all but the first (counted).
    duplicates: Literal["keep", "drop"] = "keep"

    def __post_init__(self) -> None:
        _check_choice("corpus.format", self.format, ("auto", "jsonl", "parquet", "text"))
        _check_choice("corpus.decode_errors", self.decode_errors, ("replace", "skip"))
        _check_choice("corpus.duplicates", self.duplicates, ("keep", "drop"))
        if self.chunk_num_tokens is not None:
            _check_range("corpus.chunk_num_tokens", self.chunk_num_tokens, low=2)
        if self.max_samples is not None:
            _check_range("corpus.max_samples", self.max_samples, low=1)
        if self.sample_fraction is not None:
            _check_range("corpus.sample_fraction", self.sample_fraction, low=0.0, high=1.0, low_open=True)
            if self.max_samples is not None:
                raise ConfigError("corpus.max_samples and corpus.sample_fraction are both set; set one of them")
        if not self.text_field:
            raise ConfigError("corpus.text_field is empty; set it to the record field that contains the text")


@dataclass(kw_only=True)
class CheckpointsConfig:
    """Checkpoints of one run: each URI is a checkpoint folder or a folder of ``checkpoint-*`` folders."""

    uris: list[str] = field(default_factory=list)
    # Pickled weights (.bin/.pt) can run code when loaded; they are rejected unless allowed here,
    # and even then loaded with torch.load(weights_only=True).
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass(kw_only=True)
class TasksConfig:
    """Benchmark validation sets and their seeded influence/eval split."""

    # A folder with one subfolder per benchmark (arc_easy/, boolq/, ...).
    root: Optional[str] = None
    # Benchmarks to use; empty means every known benchmark found under ``root``.
    names: list[str] = field(default_factory=list)
    # Extra or overriding files: task name -> file URI. Unknown names use the generic format.
    files: dict[str, str] = field(default_factory=dict)
    # Share of each task's examples that goes to the influence split V_t; the rest is E_t.
    influence_fraction: float = 0.5
    seed: int = 0
    # Cap on the influence-split examples used per task (seeded choice). None uses all.
    max_influence_examples: Optional[int] = 256

    def __post_init__(self) -> None:
        _check_range("tasks.influence_fraction", self.influence_fraction, low=0.0, high=1.0, low_open=True)
        if self.max_influence_examples is not None:
            _check_range("tasks.max_influence_examples", self.max_influence_examples, low=1)
        if len(set(self.names)) != len(self.names):
            twice = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(f"tasks.names lists {twice} more than once; name each task once")


@dataclass(kw_only=True)
class EvaluationConfig:
    """Capability matrix: how each checkpoint is scored on each task's influence split."""

    # gold_nll is lower-is-better; acc and acc_norm are higher-is-better.
    metric: Literal["acc", "acc_norm", "gold_nll"] = "gold_nll"
    batch_size: int = 32

    def __post_init__(self) -> None:
        _check_choice("evaluation.metric", self.metric, ("acc", "acc_norm", "gold_nll"))
        _check_range("evaluation.batch_size", self.batch_size, low=1)


@dataclass(kw_only=True)
class ProjectionConfig:
    """Random projection of per-layer gradients: phi_l = vec(P_out G P_in^T)."""

    kind: Literal["rademacher", "gaussian"] = "rademacher"
    seed: int = 0
    k_in: int = 16
    k_out: int = 16
    # Module-name substrings that choose candidate layers; empty means every Linear/Conv1D
    # layer inside the transformer blocks (the LM head and embeddings are never candidates).
    layers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_choice("projection.kind", self.kind, ("rademacher", "gaussian"))
        _check_range("projection.k_in", self.k_in, low=1)
        _check_range("projection.k_out", self.k_out, low=1)


@dataclass(kw_only=True)
class InfluenceConfig:
    """Task gradients, layer selection and per-sample scoring."""

    metric: Literal["cosine", "dot"] = "cosine"
    # Layers kept by discriminativeness: an int >= 1 is a count, a float in (0, 1] a fraction.
    keep_layers: Union[int, float] = 0.5
    # Samples per scoring batch; padded to the longest sample in the batch.
    batch_size: int = 16
    # Padded tokens per scoring batch (samples x longest sample); None limits by batch_size only.
    # A batch that still runs out of memory is split in half and retried.
    max_batch_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("influence.metric", self.metric, ("cosine", "dot"))
        if self.max_batch_tokens is not None:
            _check_range("influence.max_batch_tokens", self.max_batch_tokens, low=1)
        if isinstance(self.keep_layers, bool):
            raise ConfigError("influence.keep_layers must be a count (int >= 1) or a fraction in (0, 1]")
        if isinstance(self.keep_layers, int):
            _check_range("influence.keep_layers", self.keep_layers, low=1)
        else:
            _check_range("influence.keep_layers", self.keep_layers, low=0.0, high=1.0, low_open=True)
        _check_range("influence.batch_size", self.batch_size, low=1)


@dataclass(kw_only=True)
class MixtureConfig:
    """Regrouping and weighting: top-K% per group, density weights, token budget."""

    group_by: Literal["checkpoint", "task"] = "checkpoint"
    # Percentage of scored samples each group keeps, ranked by joint score.
    top_k_percent: float = 50.0
    # Density p(x) ~ exp(beta * mean_c J_c(x)); beta = 0 weighs every kept sample alike.
    beta: float = 1.0
    # Total training tokens the mixture supplies; None keeps every group whole, one epoch.
    token_budget: Optional[int] = None
    # Task weights u_t in the joint score; missing tasks get 1. Normalised to sum to 1.
    task_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("mixture.group_by", self.group_by, ("checkpoint", "task"))
        _check_range("mixture.top_k_percent", self.top_k_percent, low=0.0, high=100.0, low_open=True)
        _check_range("mixture.beta", self.beta, low=0.0)
        if self.token_budget is not None:
            _check_range("mixture.token_budget", self.token_budget, low=1)
        for name, weight in self.task_weights.items():
            _check_range(f"mixture.task_weights.{name}", weight, low=0.0)


@dataclass(kw_only=True)
class OutputConfig:
    uri: str = "runs/automix"
    # Write into a folder that contains another job's results (different config fingerprint).
    overwrite: bool = False


@dataclass(kw_only=True)
class RayConfig:
    """Ray placement: the cluster to join and the size of the scoring actor pools."""

    # None starts or joins a local Ray; "auto" joins a running cluster; or a ray:// address.
    address: Optional[str] = None
    # Scoring actors per artifact checkpoint: a fixed count, or None to size from the cluster.
    actors_per_checkpoint: Optional[int] = None
    # GPUs per scoring actor; None uses 1 when the cluster has GPUs, else 0.
    num_gpus_per_actor: Optional[float] = None
    # CPUs per scoring actor on a CPU-only cluster.
    num_cpus_per_actor: float = 1.0
    # Shards scored per Ray Data execution. Each finished wave is recorded, so a restarted job
    # redoes at most one wave. None splits the pending shards into four waves.
    shards_per_wave: Optional[int] = None

    def __post_init__(self) -> None:
        if self.actors_per_checkpoint is not None:
            _check_range("ray.actors_per_checkpoint", self.actors_per_checkpoint, low=1)
        if self.num_gpus_per_actor is not None:
            _check_range("ray.num_gpus_per_actor", self.num_gpus_per_actor, low=0.0)
        _check_range("ray.num_cpus_per_actor", self.num_cpus_per_actor, low=0.0, low_open=True)
        if self.shards_per_wave is not None:
            _check_range("ray.shards_per_wave", self.shards_per_wave, low=1)


SIMULATION_BASELINES = ("uniform", "source_proportional")


@dataclass(kw_only=True)
class SimulationConfig:
    """Proxy simulation: candidate mixtures, the proxy trained on each, and its held-out evaluation."""

    # Grid of candidate mixtures: one AutoMixer candidate per (top_k_percent, beta) pair.
    top_k_percents: list[float] = field(default_factory=lambda: [25.0, 50.0])
    betas: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Training seeds; every candidate trains once per seed (same initial weights for a seed).
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Tokens each proxy trains on; also the token budget of every candidate mixture.
    token_budget: int = 200_000
    arch: Literal["gpt2", "llama"] = "gpt2"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    context_length: int = 128
    batch_size: int = 16
    learning_rate: float = 1e-3
    # Evaluate on the eval splits every this many optimizer steps, and after the last step.
    eval_every: int = 50
    # Cap on the eval-split examples per task (seeded choice). None uses all.
    max_eval_examples: Optional[int] = 200
    # Baseline mixtures; "uniform" is required because every candidate is compared with it.
    baselines: list[str] = field(default_factory=lambda: list(SIMULATION_BASELINES))
    # Proxies trained at the same time; None sizes it from the cluster (GPUs, or CPUs minus one).
    max_parallel: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("top_k_percents", "betas", "seeds", "baselines"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ConfigError(f"simulation.{key}={values} lists a value more than once; list each once")
        if not self.top_k_percents or not self.betas:
            raise ConfigError("simulation.top_k_percents and simulation.betas must each list at least one value")
        for value in self.top_k_percents:
            _check_range("simulation.top_k_percents[]", value, low=0.0, high=100.0, low_open=True)
        for value in self.betas:
            _check_range("simulation.betas[]", value, low=0.0)
        if not self.seeds:
            raise ConfigError("simulation.seeds is empty; list at least one seed (three or more to see the spread)")

        for name in self.baselines:
            _check_choice("simulation.baselines[]", name, SIMULATION_BASELINES)
        if "uniform" not in self.baselines:
            raise ConfigError(f"simulation.baselines={self.baselines} lacks 'uniform'; every candidate is "
                              "compared with uniform sampling, so keep it in the list")

        _check_choice("simulation.arch", self.arch, ("gpt2", "llama"))
        for key in ("num_layers", "hidden_size", "num_heads", "batch_size", "eval_every"):
            _check_range(f"simulation.{key}", getattr(self, key), low=1)
        _check_range("simulation.context_length", self.context_length, low=2)
        _check_range("simulation.learning_rate", self.learning_rate, low=0.0, low_open=True)
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(f"simulation.hidden_size={self.hidden_size} is not divisible by "
                              f"simulation.num_heads={self.num_heads}; pick a head count that divides the width")

        step_tokens = self.batch_size * self.context_length
        if self.token_budget < step_tokens:
            raise ConfigError(f"simulation.token_budget={self.token_budget} is less than one step of "
                              f"batch_size x context_length = {step_tokens} tokens; raise the budget")
        if self.max_eval_examples is not None:
            _check_range("simulation.max_eval_examples", self.max_eval_examples, low=1)
        if self.max_parallel is not None:
            _check_range("simulation.max_parallel", self.max_parallel, low=1)

    @property
    def steps(self) -> int:
        """Optimizer steps of each proxy: the token budget in whole [batch_size, context_length] batches."""
        return self.token_budget // (self.batch_size * self.context_length)


@dataclass(kw_only=True)
class JobConfig:
    """The whole AutoMixer job."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def validate_inputs(self) -> None:
        """Check that the inputs a run needs are named; call before starting work."""
        if not self.corpus.uris:
            raise ConfigError("corpus.uris is empty; set it in the config or pass --corpus URI")
        if not self.checkpoints.uris:
            raise ConfigError("checkpoints.uris is empty; set it in the config or pass --checkpoints URI")
        if not self.tasks.root and not self.tasks.files:
            raise ConfigError("no tasks: set tasks.root or tasks.files, or pass --tasks DIR")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Return a short hash of the settings that decide the mixture.

        Where and how the job runs (``ray``), ``output.overwrite`` and the ``simulation`` settings
        are left out: changing them changes no manifest, so a rerun that only changes them may
        reuse the same output folder.
        """
        data = self.to_dict()
        for section in ("ray", "simulation"):
            data.pop(section, None)
        data["output"].pop("overwrite", None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint ``hint`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as error:
                errors.append(str(error))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {allowed}")
    if origin is Literal:
        _check_choice(key, value, args)
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {_type_name(hint)} keys, got {value!r}")
        return _build(hint, value, prefix=f"{key}.")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list")
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a mapping")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {hint.__name__}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {hint.__name__}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {name: _coerce(prefix + name, value, hints[name]) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"invalid {prefix.rstrip('.') or 'config'}: {error}") from error


def config_from_dict(data: dict[str, Any] | None) -> JobConfig:
    """Build and validate a :class:`JobConfig` from plain data (for example parsed YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a job config must be a mapping at the top level, got {type(data).__name__}")
    return _build(JobConfig, data)


def load_config(uri: str) -> JobConfig:
    """Load a YAML job config from a local path or fsspec URI."""
    try:
        with fsspec.open(uri, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"config file {uri} not found; pass the path of a YAML job config") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {uri} is not valid YAML: {error}") from error
    config = config_from_dict(data)
    logger.info("loaded config %s (fingerprint %s)", uri, config.fingerprint())
    return config


def with_overrides(config: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """Return a copy of ``config`` with dotted keys replaced (``{"corpus.uris": [...]}``), revalidated."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key {dotted}")
        node[leaf] = value
    return config_from_dict(data)


def save_resolved_config(config: JobConfig, uri: str) -> None:
    """Write the resolved config as YAML with its fingerprint, so outputs record what made them."""
    payload = {"format_version": FORMAT_VERSION, "fingerprint": config.fingerprint(), "config": config.to_dict()}
    with fsspec.open(uri, "w", encoding="utf-8") as handle:
        yaml.safe_dump(payload, handle, sort_keys=False)
