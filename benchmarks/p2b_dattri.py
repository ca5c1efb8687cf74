"""P2b: the factored featurizer against dattri's LoGra attributor, and the fidelity of both.

Both sides featurize the same randomly initialised Llama (dattri hooks only ``nn.Linear``, so
GPT-2's Conv1D layers are out), every Linear layer inside the blocks, with a 16 x 16 factored
projection per layer (dattri: ``proj_dim=256`` = 16^2). Both use the loss sum over samples of each
sample's mean token cross-entropy, so every row is one sample's gradient. dattri runs
``LoGraAttributor.cache`` with ``hessian="Identity"`` and ``offload="none"``, which is its
gradient-collection loop and nothing more. Goal: featurize >= 1.0x dattri's throughput.

Fidelity: for a few held-out samples, influence = dot product of projected gradients with each
training sample's; the script compares each method's ranking of the training samples with the
exact ranking from full per-layer weight gradients (Spearman, mean over held-out samples).

    benchmarks/.venv-peers/bin/python benchmarks/p2b_dattri.py
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

import common
from automixer_ray.featurize import Featurizer, find_candidate_layers, layer_shapes
from automixer_ray.projection import Projector

logger = logging.getLogger(__name__)
GOAL = 1.0


def llama_model(*, width: int, layers: int, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def summed_sample_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the sum over samples of each sample's mean token cross-entropy."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   input_ids[:, 1:].reshape(-1), reduction="none")
    return token_loss.view(input_ids.shape[0], -1).mean(1).sum()


def exact_dots(model, layer_names, train_ids, test_ids) -> np.ndarray:
    """Return [n_train, n_test] dot products of full per-sample gradients of the layers' weights."""
    weights = [dict(model.named_modules())[name].weight for name in layer_names]

    def gradient(ids):
        loss = summed_sample_loss(model, ids[None])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)])

    tests = torch.stack([gradient(ids) for ids in test_ids])  # [n_test, P]
    return np.stack([(tests @ gradient(ids)).numpy() for ids in train_ids])


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Return the mean over columns of Spearman's rank correlation of two [n, m] score tables."""
    from scipy.stats import spearmanr

    return float(np.mean([spearmanr(first[:, j], second[:, j]).statistic for j in range(first.shape[1])]))


def dattri_attributor(model, layer_names, proj_dim: int):
    from dattri.algorithm import LoGraAttributor
    from dattri.task import AttributionTask

    def loss_func(model_, batch, device):
        return summed_sample_loss(model_, batch["input_ids"].to(device))

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    return LoGraAttributor(task=task, layer_names=layer_names, hessian="Identity", device="cpu",
                           proj_dim=proj_dim, offload="none")


def dattri_features(attributor) -> torch.Tensor:
    """Return the cached [n_train, D] projected gradients from dattri's offload manager."""
    manager = attributor.offload_manager
    batches = sorted(manager.cached_gradients) if hasattr(manager, "cached_gradients") else None
    if batches is None:
        raise RuntimeError(f"cannot read cached gradients from {type(manager).__name__}; "
                           "check the installed dattri version's offload manager")
    rows = []
    for index in batches:
        gradients = manager.retrieve_gradients(index, is_test=False)
        # One [batch, k^2] tensor per layer in dattri 0.3; a single tensor in other versions.
        rows.append(torch.cat(gradients, dim=1) if isinstance(gradients, (list, tuple)) else gradients)
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512, help="Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="Llama blocks")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary size")
    parser.add_argument("--train-samples", type=int, default=32, help="samples featurized per timed run")
    parser.add_argument("--test-samples", type=int, default=4, help="held-out samples for fidelity")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out; dattri gets proj_dim = k^2")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: two threads on a shared 2-CPU machine oversubscribe it)")
    parser.add_argument("--name", default="p2b_dattri", help="result file name under benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    import dattri

    tokenizer = common.benchmark_tokenizer(args.vocab)
    model = llama_model(width=args.width, layers=args.layers, vocab_size=len(tokenizer))
    ids = common.token_chunks(tokenizer, args.train_samples + args.test_samples, args.tokens)
    train_ids, test_ids = ids[:args.train_samples], ids[args.train_samples:]
    layer_names = find_candidate_layers(model)

    projector = Projector("gaussian", 0, args.k, args.k, layer_shapes(model, layer_names))
    featurizer = Featurizer(model, layer_names, projector)
    batches = list(train_ids.split(args.batch_size))

    def run_ours():
        return np.concatenate([featurizer.featurize(b, torch.ones_like(b), torch.ones_like(b)).features
                               for b in batches])

    attributor = dattri_attributor(model, layer_names, args.k * args.k)
    # dattri's setup pass calls model(**batch) on a dict batch and model(batch[0][0]) on any other.
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in train_ids], batch_size=args.batch_size)
    ours_runs, dattri_runs = [], []
    for _ in range(args.repeats):
        ours_runs += common.time_call(run_ours, repeats=1, warmup=0 if ours_runs else 1)
        dattri_runs += common.time_call(lambda: attributor.cache(loader), repeats=1, warmup=0 if dattri_runs else 1)
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    ours_train = torch.from_numpy(run_ours())
    ours_test = torch.from_numpy(featurizer.featurize(test_ids, torch.ones_like(test_ids),
                                                      torch.ones_like(test_ids)).features)
    exact = exact_dots(model, layer_names, train_ids, test_ids)
    fidelity = {"featurize_spearman_vs_exact": spearman((ours_train @ ours_test.T).numpy(), exact)}
    try:
        test_loader = torch.utils.data.DataLoader([{"input_ids": row} for row in test_ids],
                                                  batch_size=args.batch_size)
        attributor.cache(loader)
        dattri_test = dattri_attributor(model, layer_names, args.k * args.k)
        dattri_test.cache(test_loader)
        fidelity["dattri_spearman_vs_exact"] = spearman(
            (dattri_features(attributor) @ dattri_features(dattri_test).T).numpy(), exact)
    except (RuntimeError, AttributeError, KeyError) as error:
        logger.warning("dattri fidelity not measured: %s", error)
        fidelity["dattri_error"] = f"{type(error).__name__}: {error}"

    ours, theirs = common.summarize(ours_runs), common.summarize(dattri_runs)
    tokens = train_ids.numel()
    common.write_result(args.name, {
        "goal": f"featurize throughput >= {GOAL}x dattri LoGra's on the same model, layers and dimension",
        "dattri": dattri.__version__ if hasattr(dattri, "__version__") else "unknown",
        "model": {"kind": "llama", "width": args.width, "layers": args.layers, "vocab": len(tokenizer),
                  "parameters": common.count_parameters(model), "projected_layers": len(layer_names)},
        "samples": args.train_samples, "tokens_per_sample": args.tokens, "batch_size": args.batch_size,
        "feature_dim": featurizer.dim,
        "featurize": {**ours, "tokens_per_s": tokens / ours["median_s"]},
        "dattri_logra_cache": {**theirs, "tokens_per_s": tokens / theirs["median_s"]},
        "speedup": theirs["median_s"] / ours["median_s"],
        "fidelity": fidelity,
        "meets_goal": theirs["median_s"] / ours["median_s"] >= GOAL,
    })


if __name__ == "__main__":
    main()
