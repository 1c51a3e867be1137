"""Entry point for `ray job submit`: one experiment on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/run_experiment.py --config configs/quickstart.yaml [key.path=value ...]

Runs `alignment run` (search, then report). To run a single stage, name it first:
    python ray_jobs/run_experiment.py sft --config configs/quickstart.yaml
Ray sets RAY_ADDRESS for the job, so the pipeline joins this cluster instead of starting its own.
The clusters in cluster/ run it: aws.yaml and gcp.yaml (`ray up`, then `ray job submit` as above), rayjob.yaml
(KubeRay: its entrypoint).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds the package

from alignment.cli import STAGES, main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in STAGES:
        argv = ["run", *argv]
    sys.exit(main(argv))
