"""Entry point for ``ray job submit``: run the AutoMixer job on the cluster this script runs in.

    ray job submit --working-dir . -- python jobs/automix.py job.yaml [--output s3://bucket/run]
    ray job submit --working-dir . -- python jobs/automix.py --config s3://bucket/job.yaml

The first argument may be the config path or URI; every other flag is that of ``automixer run``.
Under ``ray job submit`` the script joins the job's cluster through RAY_ADDRESS.
"""

import sys

from automixer_ray.cli import main, submit_arguments

if __name__ == "__main__":
    sys.exit(main(submit_arguments("run", sys.argv[1:])))
