"""Log-likelihood scoring against hand-summed logits, the metrics, selection and the Ray matrix."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch

from automixer_ray.checkpoints import discover_checkpoints, load_model, load_tokenizer
from automixer_ray.evaluation import (
    MATRIX_COLUMNS,
    ChoiceScores,
    capability_matrix,
    encode_pair,
    format_matrix,
    run_evaluate,
    score_examples,
    select_checkpoints,
    task_metrics,
)
from automixer_ray.tasks import Example, find_task_files, load_task


@pytest.fixture(scope="module")
def real_examples(shared_data) -> list[Example]:
    """A few real examples per format: plain contexts, WinoGrande's per-choice contexts, a long passage."""
    files = find_task_files(str(shared_data / "tasks"), ["piqa", "winogrande", "hellaswag", "boolq"])
    examples = []
    for name, uri in files.items():
        examples.extend(load_task(name, uri)[:2])
    return examples


def _hand_loglik(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """Sum log p(continuation tokens) from one unpadded forward pass over the last context-size tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    targets = whole[n_context:]
    max_length = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    window = whole[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([window[:-1]])).logits[0]  # [len(window) - 1, vocab]
    log_probs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for offset, token in enumerate(targets):
        position = len(window) - 1 - len(targets) + offset
        total += log_probs[position, token].item()
    return total, len(targets)


@pytest.mark.parametrize("fixture_name", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_score_matches_hand_sum(request, fixture_name, real_examples):
    path = request.getfixturevalue(fixture_name)
    model, tokenizer = load_model(path), load_tokenizer(path)
    scores = score_examples(model, tokenizer, real_examples, batch_size=5)
    assert len(scores) == len(real_examples)
    for example, score in zip(real_examples, scores):
        for choice, continuation in enumerate(example.choices):
            expected, n_tokens = _hand_loglik(model, tokenizer, example.context_for(choice), continuation)
            assert score.loglik[choice] == pytest.approx(expected, abs=1e-3, rel=1e-5)
            assert score.n_tokens[choice] == n_tokens
            assert score.n_bytes[choice] == len(continuation.encode("utf-8"))


def test_score_truncates_long_context(tiny_gpt2_dir, real_examples):
    model, tokenizer = load_model(tiny_gpt2_dir), load_tokenizer(tiny_gpt2_dir)
    boolq = next(example for example in real_examples if example.task == "boolq")
    long_context = " ".join([boolq.context] * 3)
    assert len(tokenizer(long_context)["input_ids"]) > model.config.n_positions
    example = Example(task="long", example_id="1", context=long_context, choices=boolq.choices, gold=0)
    score = score_examples(model, tokenizer, [example])[0]
    for choice, continuation in enumerate(example.choices):
        expected, _ = _hand_loglik(model, tokenizer, long_context, continuation)
        assert score.loglik[choice] == pytest.approx(expected, abs=1e-3, rel=1e-5)


def test_score_independent_of_batch_size(tiny_llama_dir, real_examples):
    model, tokenizer = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    unbatched = score_examples(model, tokenizer, real_examples, batch_size=1)
    batched_scores = score_examples(model, tokenizer, real_examples, batch_size=7)
    for single, batched in zip(unbatched, batched_scores):
        assert batched.loglik == pytest.approx(single.loglik, abs=1e-3)


def test_encode_pair_moves_trailing_space(tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer: ", "yes")
    whole = tokenizer("Answer: yes", add_special_tokens=False)["input_ids"]
    assert context_ids == tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    assert context_ids + continuation_ids == whole


def test_encode_pair_empty_context(tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    context_ids, continuation_ids = encode_pair(tokenizer, "", "Hello")
    assert context_ids == [tokenizer.eos_token_id]
    assert continuation_ids == tokenizer("Hello", add_special_tokens=False)["input_ids"]


def _scores(loglik, n_tokens, n_bytes, gold):
    return ChoiceScores(task="t", example_id="x", gold=gold, loglik=tuple(loglik),
                        n_tokens=tuple(n_tokens), n_bytes=tuple(n_bytes))


def test_acc_norm_divides_by_bytes():
    # Choice 0 has the higher sum; per byte, choice 1 wins (-12/20 > -10/5).
    metrics = task_metrics([_scores([-10.0, -12.0], [2, 6], [5, 20], gold=1)])
    assert metrics["acc"] == 0.0
    assert metrics["acc_norm"] == 1.0


def test_gold_nll_per_token_mean():
    scores = [_scores([-6.0, -1.0], [3, 1], [9, 2], gold=0), _scores([-1.0, -8.0], [1, 2], [2, 4], gold=1)]
    metrics = task_metrics(scores)
    assert metrics["gold_nll"] == pytest.approx((6.0 / 3 + 8.0 / 2) / 2)
    assert metrics["acc"] == 0.0


def test_task_metrics_empty():
    assert all(math.isnan(value) for value in task_metrics([]).values())


def _matrix(rows):
    return pd.DataFrame(rows, columns=MATRIX_COLUMNS)


def test_select_ties_go_later():
    matrix = _matrix([
        ["checkpoint-10", 10, "piqa", 0.6, 0.5, 2.0, 8],
        ["checkpoint-20", 20, "piqa", 0.6, 0.5, 2.0, 8],
        ["checkpoint-30", 30, "piqa", 0.5, 0.4, 2.5, 8],
    ])
    assert select_checkpoints(matrix, "acc") == {"piqa": "checkpoint-20"}
    assert select_checkpoints(matrix, "gold_nll") == {"piqa": "checkpoint-20"}


def test_select_metric_direction():
    matrix = _matrix([
        ["a", 1, "boolq", 0.7, 0.4, 3.0, 8],
        ["b", 2, "boolq", 0.5, 0.6, 1.0, 8],
        ["a", 1, "siqa", 0.2, 0.9, 0.5, 8],
        ["b", 2, "siqa", 0.3, 0.1, float("nan"), 8],
    ])
    assert select_checkpoints(matrix, "acc") == {"boolq": "a", "siqa": "b"}
    assert select_checkpoints(matrix, "acc_norm") == {"boolq": "b", "siqa": "a"}
    assert select_checkpoints(matrix, "gold_nll") == {"boolq": "b", "siqa": "a"}


def test_select_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric='bleu' is invalid"):
        select_checkpoints(_matrix([["a", 1, "t", 0.5, 0.5, 1.0, 2]]), "bleu")


def test_format_matrix_marks_selection():
    matrix = _matrix([
        ["checkpoint-10", 10, "piqa", 0.6, 0.5, 2.0, 8],
        ["checkpoint-20", 20, "piqa", 0.5, 0.5, 1.5, 8],
    ])
    text = format_matrix(matrix, "gold_nll", {"piqa": "checkpoint-20"})
    lines = text.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "piqa"]
    assert lines[1].split() == ["checkpoint-10", "10", "2.0000"]
    assert lines[2].split() == ["checkpoint-20", "20", "1.5000*"]
    assert "lower is better" in lines[-1]


def _second_checkpoint(source: str, target, *, seed: int, step: int) -> str:
    """Copy a checkpoint folder and give it new random weights and a later step."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(str(target))
    (target / "trainer_state.json").write_text(json.dumps({"global_step": step, "learning_rate": 0.0}))
    return str(target)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2_dir):
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_gpt2_dir, root / "checkpoint-000000")
    _second_checkpoint(tiny_gpt2_dir, root / "checkpoint-000010", seed=1, step=10)
    return root


def test_capability_matrix_ray(ray_local, run_dir, real_examples):
    checkpoints = discover_checkpoints([str(run_dir)])
    influence = {"piqa": [e for e in real_examples if e.task == "piqa"],
                 "winogrande": [e for e in real_examples if e.task == "winogrande"]}
    matrix = capability_matrix(checkpoints, influence, batch_size=4)
    assert list(matrix.columns) == MATRIX_COLUMNS
    assert len(matrix) == 4
    assert list(matrix["checkpoint"]) == ["checkpoint-000000"] * 2 + ["checkpoint-000010"] * 2
    assert list(matrix["step"]) == [0, 0, 10, 10]
    assert list(matrix["task"]) == ["piqa", "winogrande"] * 2
    assert list(matrix["n_examples"]) == [2, 2, 2, 2]
    assert matrix["gold_nll"].gt(0).all()
    assert matrix["acc"].between(0, 1).all()
    rows = matrix.set_index(["checkpoint", "task"])
    assert rows.loc[("checkpoint-000000", "piqa"), "gold_nll"] != rows.loc[("checkpoint-000010", "piqa"), "gold_nll"]
    assert set(select_checkpoints(matrix, "gold_nll")) == {"piqa", "winogrande"}


def test_run_evaluate_writes_parquet(ray_local, run_dir, shared_data, tmp_path, capsys):
    tasks_root = tmp_path / "tasks"
    for name in ("boolq", "siqa"):
        (tasks_root / name).mkdir(parents=True)
        lines = (shared_data / "tasks" / name / "validation.jsonl").read_text(encoding="utf-8").splitlines()
        (tasks_root / name / "validation.jsonl").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    output = tmp_path / "out"
    matrix = run_evaluate(checkpoint_uris=[str(run_dir)], tasks_root=str(tasks_root), output_dir=str(output),
                          metric="acc_norm", max_influence_examples=4, batch_size=8)
    written = pd.read_parquet(output / "capability.parquet")
    printed = capsys.readouterr().out
    assert len(written) == 4
    assert list(written.columns) == MATRIX_COLUMNS
    pd.testing.assert_frame_equal(written, matrix)
    assert written["n_examples"].le(4).all()
    assert "checkpoint-000010" in printed
    assert "acc_norm (higher is better)" in printed
    table = printed.strip().splitlines()[:-1]
    assert sum(line.count("*") for line in table) == 2
