"""Entry point for ``ray job submit``: run the proxy simulation of a finished (or new) AutoMixer job.

    ray job submit --working-dir . -- python jobs/simulate.py job.yaml [--output s3://bucket/run]
    ray job submit --working-dir . -- python jobs/simulate.py --config s3://bucket/job.yaml

The first argument may be the config path or URI; every other flag is that of ``automixer simulate``.
Under ``ray job submit`` the script joins the job's cluster through RAY_ADDRESS.
"""

import sys

from automixer_ray.cli import main, submit_arguments

if __name__ == "__main__":
    sys.exit(main(submit_arguments("simulate", sys.argv[1:])))
