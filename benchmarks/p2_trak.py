"""P2: the factored featurizer against TRAK's path on the same model, layers and feature dimension.

TRAK's path is per-sample gradients with torch.func (vmap over grad of a functional_call) of the
weights of the same layers the featurizer projects, then the real ``traker`` package's projector.
Its CUDA projector (``fast_jl``) cannot be built without a GPU, so on CPU the script uses
``trak.projectors.BasicProjector`` with Rademacher entries, which TRAK documents as its fallback.
Goal: >= 10x on a GPT-2 of at least 20M parameters. ``--widths`` adds a width sweep.

Needs the peers environment (``bash benchmarks/setup_peers.sh``):

    benchmarks/.venv-peers/bin/python benchmarks/p2_trak.py

BasicProjector's cost is linear in the projection dimension: it draws and multiplies one
[grad_dim, block] slice of the matrix per block. With ``--trak-dim-measured`` below the feature
dimension the script times that many output columns and scales the time to the full dimension;
the JSON marks such a number as scaled.
"""

from __future__ import annotations

import argparse
import logging

import torch

import common
from automixer_ray.featurize import Featurizer, find_candidate_layers, layer_shapes
from automixer_ray.projection import Projector

logger = logging.getLogger(__name__)
GOAL = 10.0


def per_sample_grads(model, input_ids: torch.Tensor, weight_names: list[str]) -> torch.Tensor:
    """Return [B, P] per-sample gradients of each sample's mean token loss w.r.t. ``weight_names``."""
    from torch.func import functional_call, grad, vmap

    params = {name: parameter.detach() for name, parameter in model.named_parameters() if name in weight_names}
    buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}

    def sample_loss(weights, ids):
        logits = functional_call(model, ({**weights}, buffers), (ids[None],), {"use_cache": False}).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:])

    grads = vmap(grad(sample_loss), in_dims=(None, 0))(params, input_ids)
    return torch.cat([grads[name].reshape(input_ids.shape[0], -1) for name in weight_names], dim=1)


def trak_features(model, input_ids, weight_names, projector) -> torch.Tensor:
    gradients = per_sample_grads(model, input_ids, weight_names)  # [B, P]
    return projector.project(gradients, model_id=0)


def run_width(args, tokenizer, width: int) -> dict:
    from trak.projectors import BasicProjector, ProjectionType

    model = common.gpt2_model(width=width, layers=args.layers, vocab_size=len(tokenizer)).to(args.device)
    ids = common.token_chunks(tokenizer, args.batch_size, args.tokens).to(args.device)
    layer_names = find_candidate_layers(model)
    weight_names = [f"{name}.weight" for name in layer_names]
    grad_dim = sum(dict(model.named_parameters())[name].numel() for name in weight_names)
    projector = Projector("rademacher", 0, args.k, args.k, layer_shapes(model, layer_names))
    featurizer = Featurizer(model, layer_names, projector)
    mask = torch.ones_like(ids)
    ours = common.summarize(common.time_call(lambda: featurizer.featurize(ids, mask, mask), repeats=args.repeats))

    feature_dim = featurizer.dim
    measured_dim = min(feature_dim, args.trak_dim_measured or feature_dim)
    trak_projector = BasicProjector(grad_dim=grad_dim, proj_dim=measured_dim, seed=0,
                                    proj_type=ProjectionType.rademacher, device=args.device,
                                    block_size=args.trak_block)
    grads_runs = common.time_call(lambda: per_sample_grads(model, ids, weight_names), repeats=args.trak_repeats)
    gradients = per_sample_grads(model, ids, weight_names)
    project_runs = common.time_call(lambda: trak_projector.project(gradients, model_id=0),
                                    repeats=args.trak_repeats, warmup=0)
    scale = feature_dim / measured_dim
    grads_s = common.summarize(grads_runs)["median_s"]
    project_s = common.summarize(project_runs)["median_s"] * scale
    trak_s = grads_s + project_s
    return {
        "width": width, "layers": args.layers, "parameters": common.count_parameters(model),
        "projected_weights": grad_dim, "feature_dim": feature_dim,
        "samples": args.batch_size, "tokens_per_sample": args.tokens,
        "featurize": ours,
        "trak": {"per_sample_grads_s": grads_s, "project_s": project_s,
                 "project_measured_dim": measured_dim, "project_scaled": scale != 1.0,
                 "projector": f"trak.projectors.BasicProjector(rademacher, block_size={args.trak_block})",
                 "total_s": trak_s, "grads_runs_s": grads_runs, "project_runs_s": project_runs},
        "speedup": trak_s / ours["median_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[512], help="GPT-2 hidden sizes; the first is P2")
    parser.add_argument("--layers", type=int, default=6, help="GPT-2 blocks")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary size")
    parser.add_argument("--batch-size", type=int, default=8, help="samples featurized per run")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out; TRAK projects to the same total dim")
    parser.add_argument("--repeats", type=int, default=3, help="timed featurize runs")
    parser.add_argument("--trak-repeats", type=int, default=1, help="timed runs of TRAK's path")
    parser.add_argument("--trak-block", type=int, default=32, help="BasicProjector block_size (columns per draw)")
    parser.add_argument("--trak-dim-measured", type=int, default=0,
                        help="projector columns actually timed (0 = the full feature dimension)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: two threads on a shared 2-CPU machine oversubscribe it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="p2_trak", help="result file name under benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    import trak

    tokenizer = common.benchmark_tokenizer(args.vocab)
    runs = [run_width(args, tokenizer, width) for width in args.widths]
    common.write_result(args.name, {
        "goal": f"featurize >= {GOAL}x faster than TRAK's path on >= 20M parameters",
        "traker": getattr(trak, "__version__", "unknown"), "device": args.device,
        "runs": runs,
        "meets_goal": runs[0]["parameters"] >= 20_000_000 and runs[0]["speedup"] >= GOAL,
    })


if __name__ == "__main__":
    main()
