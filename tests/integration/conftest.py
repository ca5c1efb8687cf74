"""One finished AutoMixer job on the real corpus, shared by the job and simulation tests.

A whole job on 2 CPUs takes about two minutes, mostly fixed cost (Ray start-up, model loads and
one read of the corpus), so the tests that only inspect a finished job share this one.
"""

from __future__ import annotations

import pytest

from automixer_ray.config import config_from_dict
from automixer_ray.pipeline import run_job
from shared_job import job_config


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory, shared_data, proxy_run, ray_local):
    """(config data, JobResult) of one job: whole corpus subsampled to 240, 8 benchmarks, 3 checkpoints."""
    output = tmp_path_factory.mktemp("job") / "out"
    data = job_config(shared_data / "corpus", shared_data / "tasks", proxy_run, output)
    return data, run_job(config_from_dict(data))
