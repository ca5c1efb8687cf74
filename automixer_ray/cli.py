"""The ``automixer`` command: train a tokenizer and proxy, evaluate checkpoints, run the job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

logger = logging.getLogger(__name__)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=os.environ.get("AUTOMIXER_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")


def _add_job_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config (path or fsspec URI); flags below override it")
    parser.add_argument("--corpus", action="append", metavar="URI",
                        help="corpus file, folder or glob (repeatable); overrides corpus.uris")
    parser.add_argument("--checkpoints", action="append", metavar="URI",
                        help="a run folder of checkpoint-* folders, or one checkpoint folder (repeatable)")
    parser.add_argument("--tasks", metavar="DIR", help="folder with one subfolder per benchmark; sets tasks.root")
    parser.add_argument("--output", metavar="URI", help="output folder; sets output.uri")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        help="score a seeded subsample of at most N corpus samples; sets corpus.max_samples")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="delete another job's results in the output folder first")
    parser.add_argument("--address", help="Ray address to join (default: RAY_ADDRESS or a new local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automixer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    tok.add_argument("--corpus", action="append", required=True, metavar="URI", help="corpus file, folder or glob")
    tok.add_argument("--output", required=True, metavar="DIR", help="folder for the tokenizer files")
    tok.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size in tokens (default 4096)")
    tok.add_argument("--max-chars", type=int, default=20_000_000, help="characters of text to train on")
    _add_common(tok)

    proxy = commands.add_parser("train-proxy", help="train a small causal LM on a corpus, saving checkpoints")
    proxy.add_argument("--corpus", action="append", required=True, metavar="URI", help="corpus file, folder or glob")
    proxy.add_argument("--output", required=True, metavar="DIR", help="run folder for checkpoint-* subfolders")
    proxy.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    proxy.add_argument("--save-every", type=int, default=100, help="save a checkpoint every N steps (default 100)")
    proxy.add_argument("--tokenizer", metavar="DIR", help="existing tokenizer folder; default trains one")
    proxy.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size when training a tokenizer")
    proxy.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="model architecture")
    proxy.add_argument("--context-length", type=int, default=128, help="context size in tokens")
    proxy.add_argument("--num-layers", type=int, default=2, help="transformer blocks")
    proxy.add_argument("--hidden-size", type=int, default=64, help="model width")
    proxy.add_argument("--num-heads", type=int, default=2, help="attention heads")
    proxy.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    proxy.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    proxy.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    proxy.add_argument("--max-chars", type=int, default=None, help="characters of corpus text to train on")
    _add_common(proxy)

    evaluate = commands.add_parser("evaluate", help="score every checkpoint on every task; print the matrix")
    evaluate.add_argument("--checkpoints", action="append", required=True, metavar="URI",
                          help="a run folder of checkpoint-* folders, or one checkpoint folder (repeatable)")
    evaluate.add_argument("--tasks", required=True, metavar="DIR", help="folder with one subfolder per benchmark")
    evaluate.add_argument("--output", required=True, metavar="DIR", help="folder for capability.parquet")
    evaluate.add_argument("--metric", choices=["acc", "acc_norm", "gold_nll"], default="gold_nll",
                          help="selection metric (default gold_nll)")
    evaluate.add_argument("--task", action="append", dest="task_names", metavar="NAME",
                          help="benchmark to use (repeatable; default all found)")
    evaluate.add_argument("--max-influence-examples", type=int, default=256,
                          help="influence-split examples per task (default 256)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    evaluate.add_argument("--address", help="Ray address to join (default: RAY_ADDRESS or a new local Ray)")
    _add_common(evaluate)

    run = commands.add_parser("run", help="run the whole AutoMixer job and write the manifest")
    _add_job_inputs(run)
    run.add_argument("--proxy-steps", type=int, default=300,
                     help="with no --checkpoints: steps of the proxy trained first (default 300)")
    _add_common(run)

    refresh = commands.add_parser(
        "refresh", help="score only new or changed shards, then write a new manifest version")
    _add_job_inputs(refresh)
    _add_common(refresh)

    simulate = commands.add_parser(
        "simulate", help="train proxies on candidate mixtures and compare them on held-out examples")
    _add_job_inputs(simulate)
    _add_common(simulate)

    export = commands.add_parser("export", help="write a manifest's group weights in another tool's format")
    export.add_argument("--manifest", required=True, metavar="URI", help="manifest.json of a finished job")
    export.add_argument("--format", required=True, choices=["hf-interleave", "megatron"], help="target format")
    export.add_argument("--output", required=True, metavar="PATH", help="file to write")
    _add_common(export)
    return parser


def _job_config(args: argparse.Namespace):
    from automixer_ray.config import JobConfig, load_config, with_overrides

    config = load_config(args.config) if args.config else JobConfig()
    overrides = {
        "corpus.uris": args.corpus,
        "checkpoints.uris": args.checkpoints,
        "tasks.root": args.tasks,
        "output.uri": args.output,
        "corpus.max_samples": args.max_samples,
        "output.overwrite": args.overwrite,
        "ray.address": args.address,
    }
    return with_overrides(config, overrides)


def _command_run(args: argparse.Namespace, *, refresh: bool = False) -> int:
    from automixer_ray.pipeline import run_job

    config = _job_config(args)
    if not refresh and not config.checkpoints.uris and config.corpus.uris:
        config = _train_default_proxy(config, steps=args.proxy_steps)
    result = run_job(config, refresh=refresh)
    print(f"manifest: {result.manifest_uri} (version {result.version})")
    print(f"report:   {result.report_uri}/summary.md")
    return 0


def _train_default_proxy(config, *, steps: int):
    """Train a small proxy into <output>/proxy when the user gave no checkpoints."""
    from automixer_ray.config import with_overrides
    from automixer_ray.proxy import train_proxy

    run_dir = config.output.uri.rstrip("/") + "-proxy"
    if os.path.isdir(run_dir) and any(name.startswith("checkpoint-") for name in os.listdir(run_dir)):
        logger.info("no checkpoints given; reusing the proxy run in %s", run_dir)
    else:
        logger.info("no checkpoints given; training a %d-step proxy on the corpus into %s", steps, run_dir)
        train_proxy(corpus_uris=config.corpus.uris, output_dir=run_dir, steps=steps,
                    save_every=max(1, steps // 3))
    return with_overrides(config, {"checkpoints.uris": [run_dir]})


def submit_arguments(command: str, argv: Sequence[str]) -> list[str]:
    """Return ``automixer`` arguments for a ``ray job submit`` entry point of ``command``.

    A first argument that is not a flag is the config path or URI (``jobs/automix.py job.yaml``).
    """
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return [command, "--config", argv[0], *argv[1:]]
    return [command, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from automixer_ray.checkpoints import CheckpointError
    from automixer_ray.config import ConfigError
    from automixer_ray.corpus import CorpusError
    from automixer_ray.outputs import OutputError
    from automixer_ray.tasks import TaskError

    try:
        return _dispatch(args)
    except (ConfigError, CheckpointError, CorpusError, TaskError, OutputError, FileNotFoundError) as error:
        logger.error("%s", error)
        logger.debug("traceback of the error above", exc_info=True)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train-tokenizer":
        from automixer_ray.corpus import iter_texts
        from automixer_ray.tokenizer import train_tokenizer

        train_tokenizer(iter_texts(args.corpus, max_chars=args.max_chars), args.output, vocab_size=args.vocab_size)
        print(f"tokenizer: {args.output}")
        return 0
    if args.command == "train-proxy":
        from automixer_ray.proxy import train_proxy

        paths = train_proxy(corpus_uris=args.corpus, output_dir=args.output, steps=args.steps,
                            save_every=args.save_every, tokenizer_dir=args.tokenizer, vocab_size=args.vocab_size,
                            arch=args.arch, context_length=args.context_length, num_layers=args.num_layers,
                            hidden_size=args.hidden_size, num_heads=args.num_heads, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, seed=args.seed, max_chars=args.max_chars)
        print("checkpoints:\n" + "\n".join(f"  {path}" for path in paths))
        return 0
    if args.command == "evaluate":
        from automixer_ray.evaluation import run_evaluate
        from automixer_ray.raycluster import init_local_ray

        init_local_ray(args.address)
        run_evaluate(checkpoint_uris=args.checkpoints, tasks_root=args.tasks, output_dir=args.output,
                     metric=args.metric, task_names=args.task_names,
                     max_influence_examples=args.max_influence_examples, batch_size=args.batch_size)
        return 0
    if args.command == "run":
        return _command_run(args)
    if args.command == "refresh":
        return _command_run(args, refresh=True)
    if args.command == "simulate":
        from automixer_ray.simulation import run_simulation

        result = run_simulation(_job_config(args))
        print(f"chosen mixture: {result.chosen} ({result.chosen_manifest_uri})")
        print(f"report:         {result.report_uri}")
        return 0
    if args.command == "export":
        from automixer_ray.export import export_manifest

        path = export_manifest(args.manifest, format=args.format, output=args.output)
        print(f"exported: {path}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
