"""Step 1 of AutoMixer: the capability matrix and the choice of one checkpoint per task.

AutoMixer (Chang et al., ACL 2025, arXiv 2506.21910) scores every checkpoint of a proxy run on
every benchmark and uses the best checkpoint for a benchmark as that skill's data mixer. This
module implements that step with the zero-shot multiple-choice log-likelihood scoring of
lm-evaluation-harness:

- ``acc``: the choice with the highest summed log-probability of its continuation tokens;
- ``acc_norm``: the same after dividing each sum by the continuation's length in UTF-8 bytes;
- ``gold_nll``: the gold continuation's negative log-likelihood per token, averaged over
  examples. Lower is better, and it moves smoothly even while a tiny proxy is at chance accuracy.

The selected checkpoint c*(t) is the best by the chosen metric, with ties going to the later step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import ray

from automixer_ray.checkpoints import CheckpointInfo, discover_checkpoints, load_model, load_tokenizer
from automixer_ray.config import TasksConfig
from automixer_ray.tasks import Example, prepare_task_splits

logger = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm", "gold_nll")
LOWER_IS_BETTER = {"acc": False, "acc_norm": False, "gold_nll": True}
MATRIX_COLUMNS = ["checkpoint", "step", "task", "acc", "acc_norm", "gold_nll", "n_examples"]


@dataclass(frozen=True, kw_only=True)
class ChoiceScores:
    """One example's scores: per choice, the summed log-likelihood, token count and byte length."""

    task: str
    example_id: str
    gold: int
    loglik: tuple[float, ...]
    n_tokens: tuple[int, ...]
    n_bytes: tuple[int, ...]


@dataclass(frozen=True)
class _Request:
    example: int
    choice: int
    # The model input, already left-truncated, and the continuation token ids that its last
    # len(targets) predictions are scored against.
    input_ids: list[int]
    targets: list[int]


def max_context_length(model) -> int:
    """Return the model's context size from ``n_positions`` or ``max_position_embeddings``."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"model config {type(config).__name__} has neither n_positions nor "
                     "max_position_embeddings; cannot tell how many tokens fit")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize (context, continuation) the way lm-evaluation-harness does.

    Trailing whitespace of the context moves to the continuation, the whole string is encoded
    once, and the continuation's tokens are those after the context's own token count. The
    scored tokens are therefore those of the joined text as it would appear in running text,
    even where a BPE merge crosses the boundary. An empty context becomes the eos (or bos) token.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    # verbose=False: sequences longer than the model are expected here and truncated later.
    whole = tokenizer(context + continuation, add_special_tokens=False, verbose=False)["input_ids"]
    if context:
        context_ids = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
        return context_ids, whole[len(context_ids):]
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if prefix is None:
        raise ValueError("an example has an empty context and the tokenizer has no eos or bos token "
                         "to start it; give the example a context")
    return [prefix], whole


def _build_requests(tokenizer, examples: Sequence[Example], max_length: int) -> list[_Request]:
    requests = []
    for index, example in enumerate(examples):
        for choice, continuation in enumerate(example.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, example.context_for(choice), continuation)
            if not continuation_ids:
                raise ValueError(f"task {example.task} example {example.example_id} choice {choice}: "
                                 f"the continuation {continuation!r} has no tokens")
            if len(continuation_ids) > max_length:
                raise ValueError(f"task {example.task} example {example.example_id} choice {choice}: the "
                                 f"continuation has {len(continuation_ids)} tokens, more than the model's "
                                 f"context size {max_length}; shorten the choice")
            # Keep the last max_length + 1 tokens and drop the final one: the input then
            # predicts every continuation token, and long contexts lose their start.
            whole = (context_ids + continuation_ids)[-(max_length + 1):]
            requests.append(_Request(index, choice, whole[:-1], continuation_ids))
    return requests


def _score_batch(model, batch: list[_Request], pad_id: int, device) -> list[tuple[float, int]]:
    """Return (summed log-likelihood, token count) of each request's targets in one forward pass."""
    import torch

    width = max(len(request.input_ids) for request in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, width]
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, width]
    for row, request in enumerate(batch):
        input_ids[row, :len(request.input_ids)] = torch.tensor(request.input_ids)
        attention_mask[row, :len(request.input_ids)] = 1
    with torch.inference_mode():
        # NOTE: the full [batch, width, vocab] logits are materialized; lower batch_size for
        # large vocabularies and long contexts.
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        results = []
        for row, request in enumerate(batch):
            # Right padding: the scored positions are the last len(targets) real positions.
            end = len(request.input_ids)
            start = end - len(request.targets)
            log_probs = torch.log_softmax(logits[row, start:end].float(), dim=-1)  # [n_targets, vocab]
            targets = torch.tensor(request.targets, device=log_probs.device)
            picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n_targets]
            results.append((float(picked.double().sum().item()), len(request.targets)))
    return results


def score_examples(model, tokenizer, examples: list[Example], *, batch_size: int = 32,
                   device="cpu") -> list[ChoiceScores]:
    """Score every choice of every example with ``model``: summed log-likelihood, tokens, bytes.

    Requests run longest first in right-padded batches of ``batch_size``. Contexts longer than
    the model's context size lose tokens from the left. The byte length is that of the choice
    string (UTF-8), leading space included.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; use 1 or more")
    if not examples:
        return []
    max_length = max_context_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; load it with "
                         "checkpoints.load_tokenizer, which sets one")
    requests = _build_requests(tokenizer, examples, max_length)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
    scored: dict[tuple[int, int], tuple[float, int]] = {}
    for begin in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[begin:begin + batch_size]]
        for request, result in zip(batch, _score_batch(model, batch, pad_id, device)):
            scored[(request.example, request.choice)] = result
    scores = []
    for index, example in enumerate(examples):
        per_choice = [scored[(index, choice)] for choice in range(len(example.choices))]
        scores.append(ChoiceScores(
            task=example.task,
            example_id=example.example_id,
            gold=example.gold,
            loglik=tuple(loglik for loglik, _ in per_choice),
            n_tokens=tuple(count for _, count in per_choice),
            n_bytes=tuple(len(choice.encode("utf-8")) for choice in example.choices),
        ))
    return scores


def drop_long_examples(examples: dict[str, list[Example]], tokenizer_path: str, context_length: int, *,
                       split: str = "influence") -> dict[str, list[Example]]:
    """Drop examples with a choice whose continuation has more tokens than the model's context.

    Such a choice cannot be scored whole; lm-evaluation-harness would score a truncated
    continuation instead, which favours long choices. Each drop is counted in the log per task.
    """
    from automixer_ray.checkpoints import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    kept: dict[str, list[Example]] = {}
    for task, chosen in examples.items():
        kept[task] = [example for example in chosen
                      if all(len(encode_pair(tokenizer, example.context_for(i), choice)[1]) <= context_length
                             for i, choice in enumerate(example.choices))]
        if len(kept[task]) < len(chosen):
            logger.warning("task %s: dropped %d of %d %s examples with a choice longer than the model's context "
                           "of %d tokens", task, len(chosen) - len(kept[task]), len(chosen), split, context_length)
        if not kept[task]:
            raise ValueError(f"task {task}: no {split} example fits the model's context of {context_length} tokens; "
                             "use a model with a longer context")
    return kept


def task_metrics(scores: Sequence[ChoiceScores]) -> dict[str, float]:
    """Return ``acc``, ``acc_norm`` and ``gold_nll`` over ``scores``; NaN for no examples.

    Ties between choices go to the first choice, as with ``numpy.argmax``.
    """
    if not scores:
        return {metric: math.nan for metric in METRICS}
    correct, correct_norm, gold_nll = [], [], []
    for score in scores:
        loglik = np.asarray(score.loglik, dtype=np.float64)
        per_byte = loglik / np.asarray(score.n_bytes, dtype=np.float64)
        correct.append(int(np.argmax(loglik)) == score.gold)
        correct_norm.append(int(np.argmax(per_byte)) == score.gold)
        gold_nll.append(-score.loglik[score.gold] / score.n_tokens[score.gold])
    return {
        "acc": float(np.mean(correct)),
        "acc_norm": float(np.mean(correct_norm)),
        "gold_nll": float(np.mean(gold_nll)),
    }


def _score_checkpoint(info: CheckpointInfo, influence: dict[str, list[Example]], batch_size: int,
                      allow_pickle: bool, trust_remote_code: bool) -> list[dict]:
    """Score one checkpoint on every task; runs inside a Ray task."""
    import torch

    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    model = load_model(info.path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device)
    tokenizer = load_tokenizer(info.path, trust_remote_code=trust_remote_code)
    rows = []
    for task, examples in influence.items():
        metrics = task_metrics(score_examples(model, tokenizer, examples, batch_size=batch_size, device=device))
        rows.append({"checkpoint": info.name, "step": info.step, "task": task, **metrics,
                     "n_examples": len(examples)})
        logger.info("checkpoint %s (step %d) on %s: %s", info.name, info.step, task,
                    ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    return rows


_score_checkpoint_remote = ray.remote(num_cpus=1)(_score_checkpoint)


def capability_matrix(checkpoints: list[CheckpointInfo], influence: dict[str, list[Example]], *,
                      batch_size: int = 32, allow_pickle: bool = False,
                      trust_remote_code: bool = False) -> pd.DataFrame:
    """Score every checkpoint on every task's influence split, one Ray task per checkpoint.

    Runs on whatever Ray is initialised; each task takes one GPU when the cluster has GPUs.
    Returns one row per (checkpoint, task) with the columns of ``MATRIX_COLUMNS``, ordered by
    step, then by the order of ``influence``.
    """
    if not checkpoints:
        raise ValueError("no checkpoints to score; pass at least one checkpoint folder")
    if not influence:
        raise ValueError("no tasks to score; pass at least one task's influence examples")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised; call raycluster.init_local_ray() first")
    # NOTE: the tests run on CPU only; the GPU branch (one GPU per task, model on cuda) is untested.
    num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    influence_ref = ray.put(influence)
    futures = [
        _score_checkpoint_remote.options(num_gpus=num_gpus).remote(
            info, influence_ref, batch_size, allow_pickle, trust_remote_code)
        for info in checkpoints
    ]
    logger.info("scoring %d checkpoints on %d tasks (%d GPU per checkpoint)",
                len(checkpoints), len(influence), num_gpus)
    rows: list[dict] = []
    for info, future in zip(checkpoints, futures):
        try:
            rows.extend(ray.get(future))
        except ray.exceptions.RayTaskError as error:
            raise RuntimeError(f"scoring checkpoint {info.name} ({info.path}) failed: {error}") from error
    matrix = pd.DataFrame(rows, columns=MATRIX_COLUMNS)
    task_order = {task: index for index, task in enumerate(influence)}
    matrix["_task_order"] = matrix["task"].map(task_order)
    matrix = matrix.sort_values(["step", "checkpoint", "_task_order"], kind="stable").drop(columns="_task_order")
    matrix["step"] = matrix["step"].astype("int64")
    matrix["n_examples"] = matrix["n_examples"].astype("int64")
    return matrix.reset_index(drop=True)


def select_checkpoints(matrix: pd.DataFrame, metric: str) -> dict[str, str]:
    """Return c*(t): per task, the checkpoint with the best ``metric``; ties go to the later step.

    ``gold_nll`` is lower-is-better, ``acc`` and ``acc_norm`` higher-is-better. Rows whose
    metric is NaN never win. A task where every row is NaN raises ``ValueError``.
    """
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
    selected: dict[str, str] = {}
    for task, rows in matrix.groupby("task", sort=False):
        rows = rows[rows[metric].notna()]
        if rows.empty:
            raise ValueError(f"task {task}: every checkpoint has {metric} NaN (no influence examples?); "
                             "add examples or drop the task")
        sign = 1.0 if LOWER_IS_BETTER[metric] else -1.0
        # Sort by the metric (best first), then by step (latest first) to break ties.
        ordered = sorted(rows.itertuples(index=False),
                         key=lambda row: (sign * getattr(row, metric), -row.step, row.checkpoint))
        selected[str(task)] = str(ordered[0].checkpoint)
    return selected


def format_matrix(matrix: pd.DataFrame, metric: str, selected: dict[str, str]) -> str:
    """Render ``metric`` as a checkpoints x tasks text table; ``*`` marks each task's c*(t)."""
    tasks = list(dict.fromkeys(matrix["task"]))
    checkpoints = matrix[["checkpoint", "step"]].drop_duplicates().sort_values(["step", "checkpoint"])
    values = {(row.checkpoint, row.task): getattr(row, metric) for row in matrix.itertuples(index=False)}
    header = ["checkpoint", "step", *tasks]
    lines = [header]
    for row in checkpoints.itertuples(index=False):
        cells = [str(row.checkpoint), str(row.step)]
        for task in tasks:
            value = values.get((row.checkpoint, task), math.nan)
            mark = "*" if selected.get(task) == row.checkpoint else " "
            cells.append(f"{value:.4f}{mark}")
        lines.append(cells)
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.rjust(width) if column else cell.ljust(width)
                      for column, (cell, width) in enumerate(zip(line, widths))) for line in lines]
    direction = "lower" if LOWER_IS_BETTER[metric] else "higher"
    text.append(f"{metric} ({direction} is better); * marks the checkpoint selected for each task, "
                "ties to the later step")
    return "\n".join(text)


def run_evaluate(*, checkpoint_uris: list[str], tasks_root: str, output_dir: str, metric: str = "gold_nll",
                 task_names: Optional[list[str]] = None, influence_fraction: float = 0.5, seed: int = 0,
                 max_influence_examples: Optional[int] = 256, batch_size: int = 32) -> pd.DataFrame:
    """Build the capability matrix, write ``output_dir/capability.parquet`` and print the table.

    The body of ``automixer evaluate``: starts or joins Ray when none is initialised.
    """
    import fsspec

    from automixer_ray.raycluster import init_local_ray

    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
    checkpoints = discover_checkpoints(checkpoint_uris)
    config = TasksConfig(root=tasks_root, names=list(task_names or []), influence_fraction=influence_fraction,
                         seed=seed, max_influence_examples=max_influence_examples)
    splits = prepare_task_splits(config)
    init_local_ray()
    matrix = capability_matrix(checkpoints, splits.influence, batch_size=batch_size)
    fs, path = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(path, exist_ok=True)
    target = output_dir.rstrip("/") + "/capability.parquet"
    matrix.to_parquet(target, index=False)
    selected = select_checkpoints(matrix, metric)
    print(format_matrix(matrix, metric, selected))
    logger.info("wrote %s; selected checkpoints by %s: %s", target, metric, selected)
    return matrix
