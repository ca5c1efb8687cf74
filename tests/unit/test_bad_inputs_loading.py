"""Bad inputs at the loaders and the scoring actor: unsafe checkpoints, non-finite losses,
out-of-memory batches and duplicate samples in the reduction."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from automixer_ray.checkpoints import CheckpointError, discover_checkpoints, fingerprint_checkpoint, load_model
from automixer_ray.config import MixtureConfig, ProjectionConfig, config_from_dict
from automixer_ray.featurize import find_candidate_layers
from automixer_ray.influence import (
    ScoringActor,
    build_featurizer,
    influence_column,
    influence_scores,
    is_out_of_memory,
    model_batches,
    task_gradients_for_checkpoint,
)
from automixer_ray.mixture import build_mixture
from automixer_ray.tasks import load_task

PROJECTION = ProjectionConfig(k_in=4, k_out=4)
CHECKPOINT = "checkpoint-000000"

pytestmark = pytest.mark.timeout(300)


class _ExecutesOnLoad:
    """A pickle payload that creates a file when unpickled by a full (unsafe) unpickler."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- checkpoints


def test_pickle_with_code_never_runs(tmp_path, tiny_gpt2_dir):
    path = tmp_path / CHECKPOINT
    shutil.copytree(tiny_gpt2_dir, path)
    state = load_model(str(path)).state_dict()
    marker = tmp_path / "code-ran"
    state["payload"] = _ExecutesOnLoad(str(marker))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="only pickled weights"):
        load_model(str(path))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|weights only"):
        load_model(str(path), allow_pickle=True)
    assert not marker.exists()


def test_pickle_weights_load_when_allowed(tmp_path, tiny_gpt2_dir):
    path = tmp_path / CHECKPOINT
    shutil.copytree(tiny_gpt2_dir, path)
    model = load_model(str(path))
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")

    loaded = load_model(str(path), allow_pickle=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_remote_code_rejected_unless_trusted(tmp_path, tiny_gpt2_dir):
    path = tmp_path / CHECKPOINT
    shutil.copytree(tiny_gpt2_dir, path)
    marker = tmp_path / "code-ran"
    (path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="trust_remote_code") as error:
        load_model(str(path))
    assert "modeling_custom.CustomModel" in str(error.value)
    assert str(path) in str(error.value)
    assert not marker.exists()
    # Discovery still lists it, because only loading runs the code.
    assert [info.name for info in discover_checkpoints([str(path)])] == [CHECKPOINT]


# ---------------------------------------------------------------- the scoring actor


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory, tiny_gpt2_dir, shared_data, corpus_texts):
    """A checkpoint whose embedding row for one token is NaN, the samples, and that token.

    The token occurs in exactly one sample and in no task example, so only that sample's loss
    is NaN and the task gradients stay finite.
    """
    from automixer_ray.checkpoints import load_tokenizer

    tokenizer = load_tokenizer(tiny_gpt2_dir)
    examples = {"arc_easy": load_task("arc_easy", str(shared_data / "tasks/arc_easy/test.jsonl"))[:8]}
    task_tokens = set()
    for example in examples["arc_easy"]:
        for index in range(len(example.choices)):
            task_tokens.update(tokenizer(example.context_for(index) + example.choices[index])["input_ids"])
    texts = [text for text in corpus_texts if len(text) > 400][:6]
    samples = [tokenizer(text, add_special_tokens=False)["input_ids"][:48] for text in texts]
    others = set().union(*map(set, samples[1:]))
    candidates = sorted(set(samples[0]) - others - task_tokens)
    assert candidates, "no token of sample 0 is unique to it; pick other texts"
    poison = candidates[0]

    path = tmp_path_factory.mktemp("poisoned") / CHECKPOINT
    shutil.copytree(tiny_gpt2_dir, path)
    model = load_model(str(path))
    # GPT-2 ties the output layer to the input embeddings. Untying them means the NaN row is read
    # only where the token is an input, and not as an output logit at every position.
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")
    model.save_pretrained(str(path))
    reloaded = load_model(str(path))
    assert torch.isnan(reloaded.get_input_embeddings().weight[poison]).all()
    assert torch.isfinite(reloaded.lm_head.weight).all()
    gradients = task_gradients_for_checkpoint(str(path), examples, projection=PROJECTION, batch_size=4)
    return str(path), gradients, samples


def _actor_batch(samples: list[list[int]]) -> dict[str, np.ndarray]:
    count = len(samples)
    input_ids = np.empty(count, dtype=object)
    input_ids[:] = [np.asarray(tokens, dtype=np.int32) for tokens in samples]
    return {
        "sample_id": np.array([f"{i:016x}" for i in range(count)], dtype=object),
        "input_ids": input_ids,
        "skip_reason": np.array([None] * count, dtype=object),
    }


def _actor_kwargs(path: str, gradients) -> dict:
    kept = gradients.layer_names[-2:]
    columns = np.concatenate([np.arange(i * 16, (i + 1) * 16)
                              for i, name in enumerate(gradients.layer_names) if name in kept])
    return dict(checkpoint_name=CHECKPOINT, checkpoint_path=path, layer_names=kept, projection=PROJECTION,
                task_names=["arc_easy"], task_matrix=gradients.gradients["arc_easy"][columns][None, :],
                identity=gradients.identity.restricted_to(kept).to_dict(), metric="cosine",
                batch_size=8, num_threads=1)


def _actor(path: str, gradients, **overrides) -> ScoringActor:
    return ScoringActor(**{**_actor_kwargs(path, gradients), **overrides})


def _alone_scores(actor: ScoringActor, samples: list[list[int]]) -> list[float]:
    """Score each sample in a batch of its own, with the actor's own featurizer and task matrix."""
    scores = []
    for tokens in samples:
        ones = torch.ones(1, len(tokens))
        features = actor.featurizer.featurize(torch.tensor([tokens]), ones, ones).features
        scores.append(float(influence_scores(features, actor.task_matrix)[0, 0]))
    return scores


def test_nan_loss_skips_one_sample(poisoned_run):
    path, gradients, samples = poisoned_run
    actor = _actor(path, gradients)
    output = actor(_actor_batch(samples))

    column = influence_column(CHECKPOINT, "arc_easy")
    assert output["skip_reason"][0] == f"{CHECKPOINT}:nonfinite_loss"
    assert np.isnan(output[column][0])
    assert list(output["skip_reason"][1:]) == [None] * (len(samples) - 1)
    alone = _alone_scores(actor, samples[1:])
    for row, want in enumerate(alone, start=1):
        assert np.isfinite(output[column][row]), row
        assert output[column][row] == pytest.approx(want, abs=1e-5), row


class _OutOfMemoryAbove(ScoringActor):
    """The real actor, with a fault injected: any model batch of more than ``limit`` rows runs out of memory."""

    def __init__(self, *, limit: int, error: type, **kwargs) -> None:
        super().__init__(**kwargs)
        self.limit = limit
        self.error = error
        self.batch_rows: list[int] = []

    def _featurize(self, ids, attention_mask):
        self.batch_rows.append(int(ids.shape[0]))
        if ids.shape[0] > self.limit:
            if self.error is torch.OutOfMemoryError:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 2147483648 bytes.")
        return super()._featurize(ids, attention_mask)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError], ids=["accelerator", "cpu"])
def test_out_of_memory_splits_batch(poisoned_run, error, caplog):
    path, gradients, samples = poisoned_run
    clean = samples[1:]
    reference = _actor(path, gradients)(_actor_batch(clean))
    actor = _OutOfMemoryAbove(limit=2, error=error, **_actor_kwargs(path, gradients))
    with caplog.at_level(logging.WARNING, logger="automixer_ray.influence"):
        output = actor(_actor_batch(clean))

    column = influence_column(CHECKPOINT, "arc_easy")
    assert list(output["skip_reason"]) == [None] * len(clean)
    np.testing.assert_allclose(output[column], reference[column], rtol=0, atol=1e-5)
    # 5 rows: 5 fails, then 2 (ok) + 3 (fails), then 1 + 2.
    assert actor.batch_rows == [5, 2, 3, 1, 2]
    splits = [record.getMessage() for record in caplog.records if "ran out of memory" in record.getMessage()]
    assert len(splits) == 2
    assert "retrying as 2 + 3 samples" in splits[0]


def test_out_of_memory_single_sample_skipped(poisoned_run, caplog):
    path, gradients, samples = poisoned_run
    actor = _OutOfMemoryAbove(limit=0, error=torch.OutOfMemoryError, **_actor_kwargs(path, gradients))
    with caplog.at_level(logging.ERROR, logger="automixer_ray.influence"):
        output = actor(_actor_batch(samples[1:3]))
    assert list(output["skip_reason"]) == [f"{CHECKPOINT}:out_of_memory"] * 2
    assert sum("skipping it as out_of_memory" in record.getMessage() for record in caplog.records) == 2


def test_other_runtime_errors_propagate(poisoned_run):
    path, gradients, samples = poisoned_run

    class Broken(ScoringActor):
        def _featurize(self, ids, attention_mask):
            raise RuntimeError("shape mismatch in layer 3")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        Broken(**_actor_kwargs(path, gradients))(_actor_batch(samples[1:3]))
    assert not is_out_of_memory(RuntimeError("shape mismatch in layer 3"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))


def test_token_budget_batches():
    lengths = [3, 5, 8, 8, 20, 40]
    rows = list(range(len(lengths)))
    assert model_batches(rows, lengths, max_rows=16) == [rows]
    assert model_batches(rows, lengths, max_rows=4) == [[0, 1, 2, 3], [4, 5]]
    # 16 padded tokens: [3, 5] pads to 10, adding 8 would pad to 24.
    assert model_batches(rows, lengths, max_rows=16, max_tokens=16) == [[0, 1], [2, 3], [4], [5]]
    for batch in model_batches(rows, lengths, max_rows=16, max_tokens=16):
        assert len(batch) == 1 or len(batch) * max(lengths[row] for row in batch) <= 16


def test_token_budget_in_actor(poisoned_run):
    path, gradients, samples = poisoned_run
    clean = samples[1:]
    reference = _actor(path, gradients)(_actor_batch(clean))
    actor = _OutOfMemoryAbove(limit=99, error=torch.OutOfMemoryError,
                              **{**_actor_kwargs(path, gradients), "max_batch_tokens": 100})
    output = actor(_actor_batch(clean))
    column = influence_column(CHECKPOINT, "arc_easy")
    np.testing.assert_allclose(output[column], reference[column], rtol=0, atol=1e-5)
    # Samples of 48 tokens: two fit in 100 padded tokens.
    assert max(actor.batch_rows) == 2


def test_max_batch_tokens_config():
    assert config_from_dict({"influence": {"max_batch_tokens": 4096}}).influence.max_batch_tokens == 4096
    with pytest.raises(ValueError, match="influence.max_batch_tokens=0"):
        config_from_dict({"influence": {"max_batch_tokens": 0}})


def test_zero_gradient_skipped(tmp_path, tiny_gpt2_dir, corpus_texts):
    """With the final layer norm's weight at zero, no gradient reaches any block: every sample is skipped."""
    from automixer_ray.checkpoints import load_tokenizer

    path = tmp_path / CHECKPOINT
    shutil.copytree(tiny_gpt2_dir, path)
    model = load_model(str(path))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
    model.save_pretrained(str(path))
    kept = find_candidate_layers(model)[-2:]
    identity = build_featurizer(model, kept, PROJECTION, fingerprint_checkpoint(str(path))).identity
    task_matrix = np.random.default_rng(0).normal(size=(1, len(kept) * 16)).astype(np.float32)
    actor = ScoringActor(checkpoint_name=CHECKPOINT, checkpoint_path=str(path), layer_names=kept,
                         projection=PROJECTION, task_names=["arc_easy"], task_matrix=task_matrix,
                         identity=identity.to_dict(), metric="cosine", batch_size=4, num_threads=1)
    tokenizer = load_tokenizer(str(path))
    samples = [tokenizer(text, add_special_tokens=False)["input_ids"][:32] for text in corpus_texts[:3]]
    output = actor(_actor_batch(samples))
    assert list(output["skip_reason"]) == [f"{CHECKPOINT}:zero_gradient"] * 3
    assert np.isnan(output[influence_column(CHECKPOINT, "arc_easy")]).all()


# ---------------------------------------------------------------- duplicates in the reduction


def _duplicated_frame(shared_data, n_rows: int = 120, n_copies: int = 10) -> pd.DataFrame:
    """Scored rows over real news files; the last ``n_copies`` rows repeat earlier ids at new locations."""
    rng = np.random.default_rng(11)
    files = sorted((shared_data / "corpus" / "news").glob("*/*.txt"))[:n_rows]
    frame = pd.DataFrame({
        "sample_id": [f"{i:016x}" for i in range(n_rows)],
        "doc_id": [f"{i:016x}" for i in range(n_rows)],
        "source": [path.parent.name for path in files],
        "uri": [path.as_uri() for path in files],
        "row": np.zeros(n_rows, dtype=np.int64),
        "chunk": np.zeros(n_rows, dtype=np.int32),
        "char_start": np.zeros(n_rows, dtype=np.int64),
        "char_end": np.full(n_rows, 200, dtype=np.int64),
        "n_tokens": rng.integers(20, 120, n_rows).astype(np.int32),
        "skip_reason": [None] * n_rows,
    })
    frame["location"] = [f"{uri}#row=0&chars=0-200" for uri in frame.uri]
    # Copy i repeats row i's id and score but sits in a later file: a later location.
    for i in range(n_copies):
        frame.loc[n_rows - n_copies + i, "sample_id"] = frame.loc[i, "sample_id"]
    frame[influence_column("checkpoint-100", "arc_easy")] = rng.normal(size=n_rows).astype(np.float32)
    for i in range(n_copies):
        frame.loc[n_rows - n_copies + i, influence_column("checkpoint-100", "arc_easy")] = \
            frame.loc[i, influence_column("checkpoint-100", "arc_easy")]
    frame.loc[3, "skip_reason"] = "empty_text"
    return frame


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_duplicates_policy(ray_local, shared_data, tmp_path, policy):
    import pyarrow.parquet as pq

    frame = _duplicated_frame(shared_data)
    result = build_mixture(ray_local.data.from_pandas(frame), selected={"arc_easy": "checkpoint-100"},
                           config=MixtureConfig(top_k_percent=100.0), output_dir=str(tmp_path / "out"),
                           duplicates=policy)
    counts = result.counts
    # Row 3 is a skipped original, so its later copy is the only scored row with that id.
    assert counts["duplicates"] == 9
    assert counts["read"] == len(frame)
    assert counts["read"] == counts["scored"] + sum(counts["skipped"].values())
    assert counts["skipped"].get("empty_text") == 1
    ranked = pq.read_table(tmp_path / "out" / result.groups[0]["path"]).to_pandas()
    if policy == "keep":
        assert "duplicate" not in counts["skipped"]
        assert len(ranked) == len(frame) - 1
    else:
        assert counts["skipped"]["duplicate"] == 9
        assert len(ranked) == len(frame) - 1 - 9
        assert ranked["sample_id"].is_unique
        firsts = frame.drop(index=3).groupby("sample_id")["location"].min()
        for sample_id, location in zip(ranked.sample_id, ranked.location):
            assert location == firsts[sample_id], sample_id


def test_duplicates_policy_invalid(ray_local, shared_data, tmp_path):
    frame = _duplicated_frame(shared_data, n_rows=20, n_copies=2)
    with pytest.raises(ValueError, match="duplicates='dedup' is invalid"):
        build_mixture(ray_local.data.from_pandas(frame), selected={"arc_easy": "checkpoint-100"},
                      config=MixtureConfig(), output_dir=str(tmp_path / "out"), duplicates="dedup")


def test_mixed_tokenizers_rejected(tmp_path, tiny_gpt2_dir):
    shutil.copytree(tiny_gpt2_dir, tmp_path / "checkpoint-000001")
    other = tmp_path / "checkpoint-000002"
    shutil.copytree(tiny_gpt2_dir, other)
    # Swap the ids of two vocabulary entries: same architecture, a different tokenizer.
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CheckpointError, match="checkpoint-000001 and checkpoint-000002 have different tokenizers"):
        discover_checkpoints([str(tmp_path)])


# ---------------------------------------------------------------- corpus files


def test_empty_and_replaced_files_logged(tmp_path, shared_data, caplog):
    from automixer_ray.corpus import list_shards, read_shard

    news = sorted((shared_data / "corpus" / "news").glob("*/*.txt"))[0].read_text(encoding="utf-8")[:300]
    folder = tmp_path / "corpus" / "news"
    folder.mkdir(parents=True)
    (folder / "empty.jsonl").write_bytes(b"")
    lines = [json.dumps({"text": news}).encode(), b'{"text": "caf\xe9 ' + json.dumps(news[:50])[1:-1].encode() + b'"}']
    (folder / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    shards = {shard.uri.rsplit("/", 1)[-1]: shard for shard in list_shards([str(tmp_path / "corpus")])}

    with caplog.at_level(logging.WARNING, logger="automixer_ray.corpus"):
        assert list(read_shard(shards["empty.jsonl"])) == []
        records = list(read_shard(shards["latin1.jsonl"]))
        skipped = list(read_shard(shards["latin1.jsonl"], decode_errors="skip"))
    messages = [record.getMessage() for record in caplog.records]
    assert any("empty.jsonl contains no records" in message for message in messages)
    assert sum("latin1.jsonl: 1 of 2 records had invalid UTF-8" in message for message in messages) == 1
    assert [record["skip_reason"] for record in records] == [None, None]
    assert records[1]["text"].startswith("caf\ufffd ")
    assert [record["skip_reason"] for record in skipped] == [None, "invalid_utf8"]
