"""P1: influence-scoring throughput of Featurizer.featurize against a plain training step.

Both sides see the same model and the same real corpus batches. The training step is a forward
pass with the mean token cross-entropy and a backward pass into every parameter (no optimizer
update). Featurizing projects every candidate layer ("all layers", the most work the scoring actor
can be asked for) and, as a second case, every other layer. Goal: featurize tokens/s >= 0.8x the
training step's.

    .venv/bin/python benchmarks/p1_training_step.py            # GPT-2 of 23.6M parameters
    .venv/bin/python benchmarks/p1_training_step.py --profile  # also print the top torch.profiler ops
"""

from __future__ import annotations

import argparse
import logging

import torch

import common
from automixer_ray.featurize import Featurizer, find_candidate_layers, layer_shapes
from automixer_ray.projection import Projector

logger = logging.getLogger(__name__)
GOAL = 0.8


def training_step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, autocast: bool) -> None:
    """Run one forward and backward pass into every parameter; gradients are dropped afterwards."""
    with torch.autocast(device_type=input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(model, batches: list[torch.Tensor], layer_names: list[str], *, k: int, repeats: int,
            autocast: bool) -> dict:
    """Time the training step and featurize over ``batches``; return both throughputs and their ratio."""
    projector = Projector("rademacher", 0, k, k, layer_shapes(model, layer_names))
    featurizer = Featurizer(model, layer_names, projector, autocast=autocast)
    masks = [torch.ones_like(batch) for batch in batches]
    tokens = sum(batch.numel() for batch in batches)

    def run_training() -> None:
        for batch, mask in zip(batches, masks):
            training_step(model, batch, mask, autocast)

    def run_featurize() -> None:
        for batch, mask in zip(batches, masks):
            featurizer.featurize(batch, mask, mask)

    # Interleave the two so that a change in machine load hits both alike.
    train_runs, featurize_runs = [], []
    for _ in range(repeats):
        train_runs += common.time_call(run_training, repeats=1, warmup=0 if train_runs else 1)
        featurize_runs += common.time_call(run_featurize, repeats=1, warmup=0 if featurize_runs else 1)
    train = common.summarize(train_runs)
    featurize = common.summarize(featurize_runs)
    ratios = [t / f for t, f in zip(train_runs, featurize_runs)]
    return {
        "layers": len(layer_names),
        "feature_dim": featurizer.dim,
        "training_step": {**train, "tokens_per_s": tokens / train["median_s"]},
        "featurize": {**featurize, "tokens_per_s": tokens / featurize["median_s"]},
        "ratio_median": sorted(ratios)[len(ratios) // 2],
        "ratio_runs": [round(r, 3) for r in ratios],
    }


def profile(model, batches, layer_names, *, k: int, autocast: bool, rows: int = 25) -> str:
    projector = Projector("rademacher", 0, k, k, layer_shapes(model, layer_names))
    featurizer = Featurizer(model, layer_names, projector, autocast=autocast)
    mask = torch.ones_like(batches[0])
    featurizer.featurize(batches[0], mask, mask)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in batches:
            featurizer.featurize(batch, torch.ones_like(batch), torch.ones_like(batch))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512, help="GPT-2 hidden size")
    parser.add_argument("--layers", type=int, default=6, help="GPT-2 blocks")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary size")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    parser.add_argument("--batches", type=int, default=3, help="batches per timed run")
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out of the projection")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: two threads on a shared 2-CPU machine oversubscribe it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run the forward passes under bf16 autocast")
    parser.add_argument("--name", default="p1_training_step", help="result file name under benchmarks/results")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of featurize")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = common.benchmark_tokenizer(args.vocab)
    model = common.gpt2_model(width=args.width, layers=args.layers, vocab_size=len(tokenizer)).to(args.device)
    ids = common.token_chunks(tokenizer, args.batch_size * args.batches, args.tokens).to(args.device)
    batches = list(ids.split(args.batch_size))
    candidates = find_candidate_layers(model)
    if args.profile:
        print(profile(model, batches, candidates, k=args.k, autocast=args.bf16))
        return
    cases = {"all_layers": candidates, "every_other_layer": candidates[::2]}
    results = {name: measure(model, batches, layers, k=args.k, repeats=args.repeats, autocast=args.bf16)
               for name, layers in cases.items()}
    common.write_result(args.name, {
        "goal": f"featurize tokens/s >= {GOAL}x the training step's",
        "model": {"kind": "gpt2", "width": args.width, "layers": args.layers, "vocab": len(tokenizer),
                  "parameters": common.count_parameters(model)},
        "device": args.device, "bf16": args.bf16,
        "batch": {"batch_size": args.batch_size, "tokens": args.tokens, "batches": args.batches},
        "k_in": args.k, "k_out": args.k,
        "cases": results,
        "meets_goal": all(case["ratio_median"] >= GOAL for case in results.values()),
    })


if __name__ == "__main__":
    main()
