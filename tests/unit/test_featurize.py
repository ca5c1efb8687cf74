"""Featurizer: exactness against per-sample autograd, invariance, early stop, bad samples, encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from automixer_ray.checkpoints import load_model, load_tokenizer
from automixer_ray.evaluation import encode_pair
from automixer_ray.featurize import (
    Featurizer,
    encode_task_examples,
    find_candidate_layers,
    layer_shapes,
    pad_batch,
)
from automixer_ray.projection import Projector
from automixer_ray.tasks import load_task

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tiny_gpt2_dir, tiny_llama_dir, corpus_texts):
    """A tiny real model, its candidate layers, a projector, and real token sequences of mixed lengths."""
    path = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    names = find_candidate_layers(model)
    projector = Projector("rademacher", 0, 4, 6, layer_shapes(model, names), "test")
    texts = [text for text in corpus_texts if len(text) > 400][:6]
    lengths = [7, 23, 40, 15, 31, 2]
    samples = [tokenizer(text, add_special_tokens=False)["input_ids"][:n] for text, n in zip(texts, lengths)]
    return {"kind": request.param, "model": model, "tokenizer": tokenizer, "names": names,
            "projector": projector, "samples": samples}


def exact_features(model, tokens, names, projector, target=None) -> np.ndarray:
    """Project the exact gradient of one unpadded sample's mean target-token loss, layer by layer."""
    modules = dict(model.named_modules())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    ids = torch.tensor([tokens])
    logits = model(input_ids=ids).logits[0, :-1]
    mask = torch.ones(len(tokens) - 1, dtype=torch.bool) if target is None else torch.tensor(target[1:]).bool()
    loss = F.cross_entropy(logits[mask], ids[0, 1:][mask])
    grads = torch.autograd.grad(loss, [modules[name].weight for name in names])
    blocks = []
    for name, grad in zip(names, grads):
        if isinstance(modules[name], Conv1D):
            grad = grad.T  # Conv1D stores W as [d_in, d_out]
        p_in, p_out = projector.matrices(name)
        blocks.append((p_out @ grad @ p_in.T).flatten())
    return torch.cat(blocks).detach().numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_candidate_layers_gpt2(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    names = find_candidate_layers(model)
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert names == [f"transformer.h.{i}.{suffix}" for i in range(2) for suffix in per_block]
    assert find_candidate_layers(model, ["mlp"]) == [n for n in names if ".mlp." in n]
    with pytest.raises(ValueError, match="no candidate layer matches"):
        find_candidate_layers(model, ["lm_head"])


def test_candidate_layers_llama(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    names = find_candidate_layers(model)
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{i}.{suffix}" for i in range(2) for suffix in per_block]
    assert "lm_head" not in " ".join(names)


def test_features_match_per_sample_autograd(setup):
    model, names, projector, samples = setup["model"], setup["names"], setup["projector"], setup["samples"]
    featurizer = Featurizer(model, names, projector)
    ids, attention = pad_batch(samples, setup["tokenizer"].pad_token_id)
    # The third sample counts only its last 6 tokens, like the gold continuation of a task example.
    target = attention.clone()
    target[2, :len(samples[2]) - 6] = 0
    batch = featurizer.featurize(ids, attention, target)
    assert batch.features.shape == (len(samples), len(names) * 24)
    assert batch.features.dtype == np.float32
    assert batch.valid.all(), batch.reasons
    for row, tokens in enumerate(samples):
        want = exact_features(model, tokens, names, projector, target[row, :len(tokens)].tolist())
        error = relative_error(batch.features[row], want)
        assert error <= TOLERANCE, f"{setup['kind']} sample {row}: relative error {error:.2e}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_features_batch_and_padding_invariant(setup, side):
    model, names, projector, samples = setup["model"], setup["names"], setup["projector"], setup["samples"]
    featurizer = Featurizer(model, names, projector)
    pad_id = setup["tokenizer"].pad_token_id
    probe = samples[1]
    ones = torch.ones(1, len(probe))
    alone = featurizer.featurize(torch.tensor([probe]), ones, ones)
    mates = [samples[2], samples[0], samples[4]]
    for position in range(len(mates) + 1):
        batch_tokens = mates[:position] + [probe] + mates[position:]
        ids, attention = pad_batch(batch_tokens, pad_id, side=side)
        batch = featurizer.featurize(ids, attention, attention)
        error = relative_error(batch.features[position], alone.features[0])
        assert error <= TOLERANCE, f"{setup['kind']} {side} padding, position {position}: {error:.2e}"


def _count_backward_calls(model, names):
    calls = {name: 0 for name in names}
    modules = dict(model.named_modules())

    def make_hook(name):
        def hook(*_):
            calls[name] += 1
        return hook
    handles = [modules[name].register_full_backward_hook(make_hook(name)) for name in names]
    return calls, handles


def test_backward_stops_at_earliest_kept_layer(setup):
    model, names, samples = setup["model"], setup["names"], setup["samples"]
    early = [name for name in names if ".0." in name]
    late = [name for name in names if ".1." in name]
    ids, attention = pad_batch(samples[:3], setup["tokenizer"].pad_token_id)
    embedding = model.get_input_embeddings()
    embedding_calls, embedding_handle = _count_backward_calls(model, [n for n, m in model.named_modules()
                                                                      if m is embedding])
    calls, handles = _count_backward_calls(model, early)
    try:
        late_batch = Featurizer(model, late, setup["projector"]).featurize(ids, attention, attention)
        assert sum(calls.values()) == 0, f"early layers received gradients: {calls}"
        assert sum(embedding_calls.values()) == 0
        # The same hooks fire once the early layers are kept, so the check above can fail.
        Featurizer(model, names, setup["projector"]).featurize(ids, attention, attention)
        assert all(count == 1 for count in calls.values()), calls
    finally:
        for handle in handles + embedding_handle:
            handle.remove()
    assert all(parameter.requires_grad for parameter in model.parameters())
    want = exact_features(model, samples[1], late, setup["projector"])
    assert relative_error(late_batch.features[1], want) <= TOLERANCE


def test_bad_samples_reported_rest_exact(setup):
    model, names, projector, samples = setup["model"], setup["names"], setup["projector"], setup["samples"]
    featurizer = Featurizer(model, names, projector)
    good = [samples[0], samples[1], samples[3]]
    # Rows: good, empty (all padding), one token, good, forced NaN loss, forced NaN gradient, good.
    batch_tokens = [good[0], [], samples[5][:1], good[1], samples[4], samples[2], good[2]]
    ids, attention = pad_batch(batch_tokens, setup["tokenizer"].pad_token_id)
    block_zero = "transformer.h.0" if setup["kind"] == "gpt2" else "model.layers.0"
    block_one = block_zero[:-1] + "1"
    modules = dict(model.named_modules())

    def poison_output(_module, _inputs, output):
        output = output.clone()
        output[4] = float("nan")
        return output

    def poison_gradient(_module, _inputs, output):
        def hook(grad):
            grad = grad.clone()
            grad[5] = float("nan")
            return grad
        output.register_hook(hook)

    handles = [modules[block_zero + ".mlp"].register_forward_hook(poison_output),
               modules[block_one + ".mlp"].register_forward_hook(poison_gradient)]
    try:
        batch = featurizer.featurize(ids, attention, attention)
    finally:
        for handle in handles:
            handle.remove()
    assert batch.reasons == [None, "no_target_tokens", "no_target_tokens", None, "nonfinite_loss",
                             f"nonfinite_gradient:{names[0]}", None]
    assert batch.valid.tolist() == [reason is None for reason in batch.reasons]
    assert not np.any(batch.features[~batch.valid])
    for row, tokens in [(0, good[0]), (3, good[1]), (6, good[2])]:
        error = relative_error(batch.features[row], exact_features(model, tokens, names, projector))
        assert error <= TOLERANCE, f"{setup['kind']} row {row} next to bad samples: {error:.2e}"


def test_all_invalid_batch_skips_backward(setup):
    featurizer = Featurizer(setup["model"], setup["names"], setup["projector"])
    ids, attention = pad_batch([[], [5]], setup["tokenizer"].pad_token_id)
    batch = featurizer.featurize(ids, attention, attention)
    assert batch.reasons == ["no_target_tokens", "no_target_tokens"]
    assert not batch.valid.any()


def test_featurizer_rejects_bad_layers(setup):
    model, names, projector = setup["model"], setup["names"], setup["projector"]
    with pytest.raises(ValueError, match="not modules"):
        Featurizer(model, ["no.such.layer"], projector)
    with pytest.raises(ValueError, match="no matrices"):
        Featurizer(model, names, projector.restricted_to(names[:1]))
    wrong = Projector("rademacher", 0, 4, 6, {name: (3, 3) for name in names})
    with pytest.raises(ValueError, match="rebuild the projector"):
        Featurizer(model, names, wrong)
    with pytest.raises(ValueError, match="same shape"):
        Featurizer(model, names, projector).featurize(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_close_to_float32(setup):
    model, names, projector, samples = setup["model"], setup["names"], setup["projector"], setup["samples"]
    ids, attention = pad_batch(samples[:4], setup["tokenizer"].pad_token_id)
    reference = Featurizer(model, names, projector).featurize(ids, attention, attention).features
    model.to("cuda")
    try:
        featurizer = Featurizer(model, names, projector)
        assert featurizer.autocast
        got = featurizer.featurize(ids, attention, attention).features
    finally:
        model.to("cpu")
    for row in range(len(got)):
        cosine = np.dot(got[row], reference[row]) / (np.linalg.norm(got[row]) * np.linalg.norm(reference[row]))
        assert cosine > 0.99, f"row {row}: cosine {cosine:.4f} between bf16 and float32 features"


def test_pad_batch_sides():
    ids, attention = pad_batch([[1, 2, 3], [4], []], 0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, attention = pad_batch([[1, 2, 3], [4]], 9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_encode_task_examples_targets_gold(shared_data, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    examples = load_task("arc_easy", str(shared_data / "tasks" / "arc_easy" / "test.jsonl"))[:8]
    ids, attention, target = encode_task_examples(tokenizer, examples, max_length=128)
    assert ids.shape == attention.shape == target.shape
    for row, example in enumerate(examples):
        context_ids, continuation_ids = encode_pair(tokenizer, *example.gold_pair)
        length = int(attention[row].sum())
        assert length == len(context_ids) + len(continuation_ids)
        assert ids[row, length - len(continuation_ids):length].tolist() == continuation_ids
        assert target[row].tolist() == [0] * (length - len(continuation_ids)) + [1] * len(continuation_ids) + \
            [0] * (ids.shape[1] - length)
    # Truncation drops tokens from the left and keeps the gold continuation.
    short_ids, short_attention, short_target = encode_task_examples(tokenizer, examples[:1], max_length=10)
    context_ids, continuation_ids = encode_pair(tokenizer, *examples[0].gold_pair)
    assert short_ids[0].tolist() == (context_ids + continuation_ids)[-10:]
    assert int(short_target[0].sum()) == min(len(continuation_ids), 10)
