"""Entry point for ``ray job submit``: refresh the AutoMixer outputs on the cluster this script runs in.

    ray job submit --working-dir . -- python jobs/refresh.py job.yaml [--output s3://bucket/run]
    ray job submit --working-dir . -- python jobs/refresh.py --config s3://bucket/job.yaml

The first argument may be the config path or URI; every other flag is that of ``automixer refresh``.
Under ``ray job submit`` the script joins the job's cluster through RAY_ADDRESS.
"""

import sys

from automixer_ray.cli import main, submit_arguments

if __name__ == "__main__":
    sys.exit(main(submit_arguments("refresh", sys.argv[1:])))
