"""P3 and P4: the Ray scoring stream against the bare scoring loop, and its peak memory.

The script saves a small GPT-2 checkpoint (random weights, the benchmark tokenizer) and builds the
stream exactly as the job does: ``samples.build_sample_dataset``, ``samples.score_samples`` and
``write_parquet``. The corpora are real BBC news files (shared/data/corpus/news), linked into a
small corpus of ``--news-files`` files and a large one of 10x as many, and every sample is scored
(no subsampling), so the large corpus is 10x the data read, tokenized, scored and written. The task
matrix is random (the stream's cost does not depend on its values). The bare loop calls
``influence.ScoringActor`` in this process on the same tokenized samples, with no Ray.

P3 = bare-loop time / stream time on the large corpus (goal >= 85%); the small corpus's ratio is
recorded too, where the stream's fixed start-up (Ray Data, actor start and model load) weighs
more. P4 = peak RSS of the driver plus every Ray process on the large corpus against the small one
(goal: within 10%).

    .venv/bin/python benchmarks/p3_p4_pipeline.py
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import pathlib
import tempfile
import time

import numpy as np

import common
import memory
from automixer_ray.checkpoints import CheckpointInfo, fingerprint_checkpoint
from automixer_ray.config import CorpusConfig, InfluenceConfig, JobConfig, ProjectionConfig
from automixer_ray.featurize import find_candidate_layers
from automixer_ray.influence import ScoringActor, build_featurizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class StreamPlan:
    """The fields of pipeline.ScoringPlan that samples.score_samples reads."""

    artifacts: list
    kept_layers: list
    task_names: list
    task_matrices: dict
    identities: dict


def save_checkpoint(folder: str, width: int, layers: int, context: int) -> tuple[str, StreamPlan, ProjectionConfig]:
    tokenizer = common.benchmark_tokenizer()
    model = common.gpt2_model(width=width, layers=layers, vocab_size=len(tokenizer), context=context)
    path = f"{folder}/checkpoint-000100"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    projection = ProjectionConfig()
    kept = find_candidate_layers(model)[::2]
    featurizer = build_featurizer(model, kept, projection, fingerprint_checkpoint(path))
    tasks = ["arc_easy", "boolq", "piqa"]
    matrix = np.random.default_rng(0).standard_normal((len(tasks), featurizer.dim)).astype(np.float32)
    info = CheckpointInfo(name="checkpoint-000100", path=path, step=100, fingerprint=fingerprint_checkpoint(path))
    plan = StreamPlan(artifacts=[info], kept_layers=kept, task_names=tasks, task_matrices={info.name: matrix},
                      identities={info.name: featurizer.identity.to_dict()})
    return path, plan, projection


def run_stream(config: JobConfig, plan: StreamPlan, path: str, output: str) -> tuple[float, float, int]:
    """Run read -> tokenize -> score -> write; return (seconds, peak RSS bytes, rows written)."""
    import ray

    from automixer_ray import corpus
    from automixer_ray.samples import build_sample_dataset, score_samples, subsample_threshold

    shards = corpus.list_shards(config.corpus.uris)
    with memory.PeakRSS() as peak:
        start = time.perf_counter()
        max_key = subsample_threshold(config, shards, tokenizer_path=path)
        samples = build_sample_dataset(config, shards, tokenizer_path=path, max_key=max_key)
        score_samples(config, samples, plan).write_parquet(output)
        seconds = time.perf_counter() - start
    return seconds, peak.peak_bytes, ray.data.read_parquet(output).count()


def run_bare(config: JobConfig, plan: StreamPlan, path: str, projection: ProjectionConfig) -> tuple[float, int]:
    """Score the stream's samples in this process with ScoringActor; tokenizing is not timed."""
    from automixer_ray import corpus
    from automixer_ray.samples import build_sample_dataset, subsample_threshold

    shards = corpus.list_shards(config.corpus.uris)
    max_key = subsample_threshold(config, shards, tokenizer_path=path)
    rows = build_sample_dataset(config, shards, tokenizer_path=path, max_key=max_key).take_all()
    info = plan.artifacts[0]
    actor = ScoringActor(checkpoint_name=info.name, checkpoint_path=path, layer_names=plan.kept_layers,
                         projection=projection, task_names=plan.task_names,
                         task_matrix=plan.task_matrices[info.name], identity=plan.identities[info.name],
                         metric="cosine", batch_size=config.influence.batch_size, num_threads=1)
    step = config.influence.batch_size * 4
    start = time.perf_counter()
    for first in range(0, len(rows), step):
        chunk = rows[first:first + step]
        actor({"input_ids": np.array([np.asarray(r["input_ids"]) for r in chunk] + [None], dtype=object)[:-1],
               "skip_reason": np.array([r["skip_reason"] for r in chunk], dtype=object)})
    return time.perf_counter() - start, len(rows)


def p3_entry(news_files: int, rows: int, bare_rows: int, stream_s: float, bare_s: float) -> dict:
    return {"news_files": news_files, "samples": rows, "bare_samples": bare_rows, "stream_s": stream_s,
            "bare_s": bare_s, "stream_vs_bare": bare_s / stream_s, "goal": ">= 0.85",
            "meets_goal": bare_s / stream_s >= 0.85}


def link_news_corpus(folder: str, num_files: int) -> str:
    """Link ``num_files`` BBC news files, taken round-robin over the categories, under ``folder``/news."""
    categories = sorted(path for path in (common.CORPUS_DIR / "news").iterdir() if path.is_dir())
    files = [sorted(category.glob("*.txt")) for category in categories]
    picked = [column for row in itertools.zip_longest(*files) for column in row if column is not None][:num_files]
    if len(picked) < num_files:
        raise ValueError(f"--news-files asks for {num_files} files per corpus but the news folder has {len(picked)}")
    for path in picked:
        target = pathlib.Path(folder) / "news" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--news-files", type=int, default=200, help="files in the small corpus; the large has 10x")
    parser.add_argument("--width", type=int, default=256, help="GPT-2 hidden size")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks")
    parser.add_argument("--chunk-tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--skip-large", action="store_true", help="run the small corpus only (no P4)")
    parser.add_argument("--name", default="p3_p4_pipeline", help="result file name under benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from automixer_ray.raycluster import init_local_ray

    init_local_ray()
    with tempfile.TemporaryDirectory() as folder:
        path, plan, projection = save_checkpoint(folder, args.width, args.layers, args.chunk_tokens)

        def config_for(num_files: int) -> JobConfig:
            corpus_dir = link_news_corpus(f"{folder}/corpus-{num_files}", num_files)
            return JobConfig(corpus=CorpusConfig(uris=[corpus_dir], chunk_num_tokens=args.chunk_tokens),
                             projection=projection, influence=InfluenceConfig(batch_size=16))

        small = config_for(args.news_files)
        stream_s, small_peak, rows = run_stream(small, plan, path, f"{folder}/small")
        bare_s, bare_rows = run_bare(small, plan, path, projection)
        result = {"model": {"width": args.width, "layers": args.layers, "chunk_tokens": args.chunk_tokens,
                            "kept_layers": len(plan.kept_layers)},
                  "p3_small": p3_entry(args.news_files, rows, bare_rows, stream_s, bare_s)}
        if not args.skip_large:
            large = config_for(args.news_files * 10)
            large_s, large_peak, large_rows = run_stream(large, plan, path, f"{folder}/large")
            large_bare_s, large_bare_rows = run_bare(large, plan, path, projection)
            result["p3"] = p3_entry(args.news_files * 10, large_rows, large_bare_rows, large_s, large_bare_s)
            result["p4"] = {"small": {"news_files": args.news_files, "samples": rows,
                                      "peak_rss_gib": small_peak / 2**30, "seconds": stream_s},
                            "large": {"news_files": args.news_files * 10, "samples": large_rows,
                                      "peak_rss_gib": large_peak / 2**30, "seconds": large_s},
                            "growth": large_peak / small_peak, "goal": "<= 1.10",
                            "meets_goal": large_peak / small_peak <= 1.10}
    common.write_result(args.name, result)


if __name__ == "__main__":
    main()
