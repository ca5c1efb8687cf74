"""Start or join Ray, and size actor pools from the cluster's resources.

On a small machine an actor pool that takes every CPU leaves none for the read and tokenize tasks,
and Ray Data then waits forever, because actors start before reads. Pools are therefore sized from
a CPU budget that always leaves room for the other stages.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import ray

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# CPUs each read, tokenize and write task or actor of the sample stream requests. Scoring actors
# hold their CPUs for the whole stream, so every other stage must fit in what is left; a stage
# that asks for more than the free remainder would wait forever.
STREAM_TASK_CPUS = 0.25


def init_local_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None) -> None:
    """Join the Ray at ``address``, or start a local one with every port bound to 127.0.0.1.

    ``address=None`` joins the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``) and
    otherwise starts a local Ray without a dashboard.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        logger.info("joined Ray at %s: %s", address, ray.cluster_resources())
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
        runtime_env=runtime_env,
        configure_logging=False,
    )
    logger.info("started local Ray on %s: %s", LOOPBACK, ray.cluster_resources())


def _stream_reserve(total_cpus: float) -> float:
    return max(1.0, 0.25 * total_cpus)


def max_tokenize_actors() -> int:
    """Return how many tokenizing actors fit in the CPUs kept free of scoring, with room for reads."""
    total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(_stream_reserve(total_cpus) / STREAM_TASK_CPUS) // 2)


@dataclass(frozen=True, kw_only=True)
class PoolPlan:
    """Size of each artifact checkpoint's scoring actor pool."""

    num_actors: int
    num_cpus_per_actor: float
    num_gpus_per_actor: float
    # Torch intra-op threads inside one actor.
    num_threads_per_actor: int


def plan_pools(
    num_pools: int,
    *,
    actors_per_pool: Optional[int] = None,
    num_gpus_per_actor: Optional[float] = None,
    num_cpus_per_actor: float = 1.0,
) -> PoolPlan:
    """Size ``num_pools`` scoring pools so that at least one CPU stays free for reads."""
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1.0))
    total_gpus = float(resources.get("GPU", 0.0))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if total_gpus >= 1 else 0.0
    if num_gpus_per_actor > 0 and total_gpus == 0:
        raise ValueError(f"ray.num_gpus_per_actor={num_gpus_per_actor} but the cluster has no GPUs; "
                         "set it to 0 or null to score on CPUs")

    # Keep a quarter of the CPUs, and at least one, for reading, tokenizing and writing.
    cpu_budget = max(total_cpus - _stream_reserve(total_cpus), 0.25)
    cpus_per_pool = cpu_budget / num_pools
    cpus = min(num_cpus_per_actor, cpus_per_pool)
    if num_gpus_per_actor > 0:
        max_actors = max(1, int(total_gpus / num_gpus_per_actor / num_pools))
        cpus = min(cpus, 1.0)
    else:
        max_actors = max(1, int(cpus_per_pool // cpus))
    num_actors = max_actors if actors_per_pool is None else actors_per_pool
    if actors_per_pool is not None and actors_per_pool > max_actors:
        if num_gpus_per_actor > 0:
            raise ValueError(f"ray.actors_per_checkpoint={actors_per_pool} needs {actors_per_pool * num_pools} GPUs "
                             f"for {num_pools} pools but the cluster has {total_gpus}; lower it or leave it unset")
        # A fixed-size pool waits for all its actors, so shrink each actor's CPU share until they fit.
        cpus = cpus_per_pool / actors_per_pool
        logger.warning("ray.actors_per_checkpoint=%d is more than the %d actors per pool that fit beside the read "
                       "tasks (%s CPUs); each actor gets %.2f CPU instead", actors_per_pool, max_actors,
                       total_cpus, cpus)
    plan = PoolPlan(num_actors=num_actors, num_cpus_per_actor=cpus, num_gpus_per_actor=num_gpus_per_actor,
                    num_threads_per_actor=max(1, math.floor(cpus)))
    logger.info("scoring pools: %d pool(s) x %d actor(s), %.2f CPU and %.2f GPU per actor (cluster: %s CPUs, %s GPUs)",
                num_pools, plan.num_actors, plan.num_cpus_per_actor, plan.num_gpus_per_actor, total_cpus, total_gpus)
    return plan


# Rows per hash partition of a grouped aggregation. Ray Data's default is a fixed 200 partitions,
# which on a small cluster costs about 20 s of task start-up even for a table of a few hundred rows.
ROWS_PER_SHUFFLE_PARTITION = 1_000_000
MAX_SHUFFLE_PARTITIONS = 200


def shuffle_partitions(num_rows: int) -> int:
    """Return the number of hash partitions for grouping ``num_rows`` rows: one per million, 1 to 200."""
    return max(1, min(MAX_SHUFFLE_PARTITIONS, math.ceil(num_rows / ROWS_PER_SHUFFLE_PARTITION)))
