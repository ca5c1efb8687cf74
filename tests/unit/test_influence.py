"""Task gradients, layer selection, influence scores, fidelity to exact gradients, the scoring actor."""

from __future__ import annotations

import glob
import logging
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from automixer_ray.checkpoints import fingerprint_checkpoint, load_model, load_tokenizer
from automixer_ray.config import ProjectionConfig
from automixer_ray.evaluation import encode_pair
from automixer_ray.featurize import Featurizer, find_candidate_layers, layer_shapes, pad_batch
from automixer_ray.influence import (
    ScoringActor,
    compute_task_gradients,
    influence_column,
    influence_scores,
    layer_scores,
    select_layers,
    task_gradients_for_checkpoint,
)
from automixer_ray.projection import Projector, ProjectorMismatchError
from automixer_ray.tasks import load_task

PROJECTION = ProjectionConfig(k_in=4, k_out=4)


@pytest.fixture(scope="module")
def task_examples(shared_data):
    """Real benchmark examples: 12 from ARC-Easy and 12 from PIQA."""
    return {
        "arc_easy": load_task("arc_easy", str(shared_data / "tasks/arc_easy/test.jsonl"))[:12],
        "piqa": load_task("piqa", str(shared_data / "tasks/piqa/validation.jsonl"))[:12],
    }


@pytest.fixture(scope="module")
def gradients(tiny_gpt2_dir, task_examples):
    return task_gradients_for_checkpoint(tiny_gpt2_dir, task_examples, projection=PROJECTION, batch_size=5)


def test_task_gradients_for_checkpoint(tiny_gpt2_dir, gradients):
    model = load_model(tiny_gpt2_dir)
    assert gradients.layer_names == find_candidate_layers(model)
    assert gradients.block_size == 16
    assert gradients.identity.model_fingerprint == fingerprint_checkpoint(tiny_gpt2_dir)
    assert [layer[0] for layer in gradients.identity.layers] == gradients.layer_names
    for task, vector in gradients.gradients.items():
        assert vector.shape == (16 * len(gradients.layer_names),), task
        assert vector.dtype == np.float32
        assert np.linalg.norm(vector) > 0


def test_task_gradient_is_mean_of_example_features(tiny_gpt2_dir, task_examples, gradients):
    model = load_model(tiny_gpt2_dir)
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    names = gradients.layer_names
    featurizer = Featurizer(model, names, Projector.from_config(PROJECTION, layer_shapes(model, names), "x"))
    examples = task_examples["piqa"]
    singles = [compute_task_gradients(model, tokenizer, {"piqa": [example]}, featurizer)["piqa"]
               for example in examples]
    want = np.mean(singles, axis=0)
    got = gradients.gradients["piqa"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4


def test_layer_scores_pairwise_cosine():
    block = 3
    names = ["same", "orthogonal", "opposite"]
    direction = np.array([1.0, 2.0, 0.5])
    other = np.array([2.0, -1.0, 0.0])  # orthogonal to direction
    first = {"a": np.concatenate([direction, direction, direction]),
             "b": np.concatenate([2 * direction, other, -direction])}
    scores = layer_scores({"c1": first, "c2": first}, names, block)
    assert scores["same"] == pytest.approx(0.0, abs=1e-9)
    assert scores["orthogonal"] == pytest.approx(1.0)
    assert scores["opposite"] == pytest.approx(2.0)
    # Averaged over checkpoints: a second checkpoint where the first layer is orthogonal.
    second = {"a": first["a"], "b": np.concatenate([other, other, -direction])}
    scores = layer_scores({"c1": first, "c2": second}, names, block)
    assert scores["same"] == pytest.approx(0.5)


def test_layer_scores_one_task_ties(caplog):
    with caplog.at_level(logging.WARNING, logger="automixer_ray.influence"):
        scores = layer_scores({"c1": {"a": np.ones(6)}}, ["x", "y"], 3)
    assert scores == {"x": 0.0, "y": 0.0}
    assert "no task pairs" in caplog.text
    assert select_layers(scores, 1, ["x", "y"]) == ["x"]


def test_layer_scores_reject_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        layer_scores({"c1": {"a": np.ones(5), "b": np.ones(6)}}, ["x", "y"], 3)


def test_select_layers_count_fraction_ties():
    order = ["l0", "l1", "l2", "l3"]
    scores = {"l0": 0.1, "l1": 0.9, "l2": 0.5, "l3": 0.9}
    assert select_layers(scores, 2, order) == ["l1", "l3"]
    assert select_layers(scores, 0.75, order) == ["l1", "l2", "l3"]
    assert select_layers(scores, 0.1, order) == ["l1"]
    assert select_layers(scores, 10, order) == order
    tied = dict.fromkeys(order, 0.3)
    assert select_layers(tied, 2, order) == ["l0", "l1"]
    for bad in (0, -1, 0.0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="keep"):
            select_layers(scores, bad, order)
    with pytest.raises(ValueError, match="layer_order"):
        select_layers(scores, 1, order[:3])


def test_influence_scores_cosine_and_dot():
    features = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [np.nan, 1.0, 0.0]])
    tasks = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    cosine = influence_scores(features, tasks)
    assert cosine.dtype == np.float32
    assert cosine.shape == (4, 2)
    np.testing.assert_allclose(cosine[0], [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(cosine[1], [1 / np.sqrt(2), 3 / (5 * np.sqrt(2))], rtol=1e-6)
    assert np.isnan(cosine[2]).all()
    assert np.isnan(cosine[3]).all()
    dot = influence_scores(features, tasks, "dot")
    np.testing.assert_allclose(dot[1], [2.0, 3.0])
    assert np.isnan(dot[2]).all()
    with pytest.raises(ValueError, match="same D"):
        influence_scores(features, np.ones((2, 4)))
    with pytest.raises(ValueError, match="metric"):
        influence_scores(features, tasks, "euclidean")


# ---------------------------------------------------------------- fidelity on a trained proxy

def _corpus_samples(shared_data, tokenizer, wikitext: list[str], per_source: int) -> list[list[int]]:
    """Draw 64-token samples from each of the five real corpus sources."""
    root = shared_data / "corpus"
    posts = pq.read_table(root / "stackexchange/cardano-posts.parquet").column("text").to_pylist()
    sources = {
        "books": [path.read_text(errors="replace")[20_000:60_000] for path in sorted((root / "books").glob("*.txt"))],
        "shakespeare": [(root / "shakespeare/tinyshakespeare.txt").read_text()[:200_000]],
        "stackexchange": ["\n".join(posts[:400])],
        "news": [open(path, errors="replace").read() for path in sorted(glob.glob(str(root / "news/*/*.txt")))[1::7][:80]],
        "wikitext": wikitext,
    }
    generator = random.Random(0)
    samples = []
    for documents in sources.values():
        tokens = []
        for document in documents:
            tokens += tokenizer(document, add_special_tokens=False)["input_ids"]
        starts = generator.sample(range(0, len(tokens) - 64, 64), per_source)
        samples += [tokens[start:start + 64] for start in starts]
    return samples


def _exact_gradient(model, weights, tokens: list[int], num_targets: int) -> torch.Tensor:
    ids = torch.tensor(tokens)
    logits = model(input_ids=ids[None]).logits[0, :-1]
    mask = torch.zeros(len(tokens) - 1, dtype=torch.bool)
    mask[len(tokens) - 1 - num_targets:] = True
    loss = F.cross_entropy(logits[mask], ids[1:][mask])
    return torch.cat([grad.flatten() for grad in torch.autograd.grad(loss, weights)])


def test_projected_influence_ranks_like_exact(shared_data, corpus_texts, proxy_run):
    """Check the ranking on the last proxy checkpoint, over 40 samples from each of five sources."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is several times faster for this tiny model on a busy machine
    try:
        checkpoint = os.path.join(proxy_run, "checkpoint-000150")
        tokenizer = load_tokenizer(checkpoint)
        model = load_model(checkpoint)
        samples = _corpus_samples(shared_data, tokenizer, corpus_texts[0:120:3], per_source=40)
        examples = load_task("arc_easy", str(shared_data / "tasks/arc_easy/test.jsonl"))[:64]
        names = find_candidate_layers(model)
        projector = Projector.from_config(ProjectionConfig(), layer_shapes(model, names))
        featurizer = Featurizer(model, names, projector)
        task_gradient = compute_task_gradients(model, tokenizer, {"arc_easy": examples}, featurizer)["arc_easy"]
        ids = torch.tensor(samples)
        features = featurizer.featurize(ids, torch.ones_like(ids), torch.ones_like(ids))
        assert features.valid.all()
        projected = influence_scores(features.features, task_gradient[None])[:, 0]

        modules = dict(model.named_modules())
        weights = [modules[name].weight for name in names]
        for weight in weights:
            weight.requires_grad_(True)
        exact_task = torch.zeros(sum(weight.numel() for weight in weights))
        for example in examples:
            context_ids, continuation_ids = encode_pair(tokenizer, *example.gold_pair)
            tokens = (context_ids + continuation_ids)[-128:]
            exact_task += _exact_gradient(model, weights, tokens, min(len(continuation_ids), len(tokens)))
        exact = [float(F.cosine_similarity(_exact_gradient(model, weights, sample, 63), exact_task, dim=0))
                 for sample in samples]
    finally:
        torch.set_num_threads(threads)
    rho = spearmanr(projected, exact).statistic
    print(f"Spearman rho, projected vs exact cosine influence, {len(samples)} samples, "
          f"{len(names)} layers x 16x16: {rho:.4f}")
    # NOTE: on this proxy (2-layer GPT-2, width 64, 150 steps) projector seeds 0 to 3 gave rho
    # 0.970, 0.983, 0.977 and 0.943, so a seed other than the default can miss 0.95.
    assert len(samples) >= 200
    assert rho >= 0.95


# ---------------------------------------------------------------- the scoring actor

def _sample_batch(samples: list[list[int]]) -> dict[str, np.ndarray]:
    """A numpy batch with the sample columns of the design, as Ray Data hands it to map_batches."""
    count = len(samples)
    input_ids = np.empty(count, dtype=object)
    input_ids[:] = [np.asarray(tokens, dtype=np.int32) for tokens in samples]
    return {
        "sample_id": np.array([f"{i:016x}" for i in range(count)], dtype=object),
        "doc_id": np.array(["d"] * count, dtype=object),
        "source": np.array(["wikitext"] * count, dtype=object),
        "uri": np.array(["file:///corpus/a.jsonl"] * count, dtype=object),
        "row": np.arange(count, dtype=np.int64),
        "chunk": np.zeros(count, dtype=np.int32),
        "char_start": np.zeros(count, dtype=np.int64),
        "char_end": np.full(count, 10, dtype=np.int64),
        "location": np.array([f"file:///corpus/a.jsonl#row={i}&chars=0-10" for i in range(count)], dtype=object),
        "n_tokens": np.array([len(tokens) for tokens in samples], dtype=np.int32),
        "input_ids": input_ids,
        "skip_reason": np.array([None] * count, dtype=object),
    }


def _actor_arguments(tiny_gpt2_dir, gradients, kept, **overrides):
    columns = np.concatenate([np.arange(i * 16, (i + 1) * 16) for i, name in enumerate(gradients.layer_names)
                              if name in kept])
    tasks = sorted(gradients.gradients)
    arguments = dict(checkpoint_name="checkpoint-000000", checkpoint_path=tiny_gpt2_dir, layer_names=kept,
                     projection=PROJECTION, task_names=tasks,
                     task_matrix=np.stack([gradients.gradients[task][columns] for task in tasks]),
                     identity=gradients.identity.restricted_to(kept).to_dict(), metric="cosine",
                     batch_size=3, num_threads=1)
    arguments.update(overrides)
    return arguments


def test_scoring_actor_scores_numpy_batch(tiny_gpt2_dir, gradients, corpus_texts):
    kept = gradients.layer_names[4:]
    arguments = _actor_arguments(tiny_gpt2_dir, gradients, kept)
    actor = ScoringActor(**arguments)
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    texts = [text for text in corpus_texts if len(text) > 400][:5]
    good = [tokenizer(text, add_special_tokens=False)["input_ids"][:length]
            for text, length in zip(texts, [12, 40, 7, 25, 60])]
    samples = [good[0], [], good[1], [], good[2], list(range(200)), good[3], [3], good[4]]
    batch = _sample_batch(samples)
    batch["skip_reason"][1] = "duplicate"
    output = actor(batch)

    columns = [influence_column("checkpoint-000000", task) for task in arguments["task_names"]]
    assert columns == ["checkpoint-000000/arc_easy", "checkpoint-000000/piqa"]
    for name, values in batch.items():
        if name != "skip_reason":
            assert output[name] is values, name
    assert output["skip_reason"].tolist() == [
        None, "duplicate", None, "checkpoint-000000:no_target_tokens", None,
        "checkpoint-000000:too_long:200>128", None, "checkpoint-000000:no_target_tokens", None]
    model = load_model(tiny_gpt2_dir)
    projector = Projector.from_config(PROJECTION, layer_shapes(model, kept), "x")
    featurizer = Featurizer(model, kept, projector)
    for row, tokens in enumerate(samples):
        scored = output["skip_reason"][row] is None
        for index, column in enumerate(columns):
            assert output[column].dtype == np.float32
            if not scored:
                assert np.isnan(output[column][row]), (row, column)
                continue
            ones = torch.ones(1, len(tokens))
            alone = featurizer.featurize(torch.tensor([tokens]), ones, ones).features
            want = influence_scores(alone, arguments["task_matrix"])[0, index]
            assert output[column][row] == pytest.approx(want, abs=1e-4), (row, column)


def test_scoring_actor_rejects_mismatch(tiny_gpt2_dir, gradients):
    kept = gradients.layer_names[4:]
    other_seed = ProjectionConfig(k_in=4, k_out=4, seed=1)
    with pytest.raises(ProjectorMismatchError, match="seed"):
        ScoringActor(**_actor_arguments(tiny_gpt2_dir, gradients, kept, projection=other_seed))
    wrong_layers = gradients.identity.restricted_to(gradients.layer_names[:4]).to_dict()
    with pytest.raises(ProjectorMismatchError, match="layers"):
        ScoringActor(**_actor_arguments(tiny_gpt2_dir, gradients, kept, identity=wrong_layers))
    with pytest.raises(ValueError, match="task_matrix has shape"):
        ScoringActor(**_actor_arguments(tiny_gpt2_dir, gradients, kept, task_matrix=np.ones((2, 5))))


def test_skip_reason_nan_is_no_reason():
    """Ray Data hands an all-null skip_reason column over as float32 NaN; such rows must be scored."""
    from automixer_ray.influence import _has_skip_reason

    assert not _has_skip_reason(np.float32("nan"))
    assert not _has_skip_reason(float("nan"))
    assert not _has_skip_reason(None)
    assert not _has_skip_reason("")
    assert _has_skip_reason("empty_text")
