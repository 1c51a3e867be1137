"""Connecting to Ray: an existing cluster (``ray job submit`` sets RAY_ADDRESS) or an embedded local one."""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ActorPoolConfig

log = logging.getLogger("alignment")


def actor_threads(pool: ActorPoolConfig) -> int:
    """Torch threads for an actor of ``pool``: its CPUs, rounded up."""
    return max(1, math.ceil(pool.cpus_per_actor))


def actor_pool(pool: ActorPoolConfig) -> dict[str, Any]:
    """``map_batches`` arguments for a Ray Data actor pool as ``pool`` says."""
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=pool.num_actors), "num_cpus": pool.cpus_per_actor,
            "num_gpus": pool.gpus_per_actor or None}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the configured cluster, else RAY_ADDRESS, else start an embedded local Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Local single-user clusters need no token; a cluster with auth configures it in the environment.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train's print patch tees output that a library captures on purpose
    # (dill disassembles functions into a redirected stdout while datasets fingerprints a transform) into
    # the worker log, thousands of lines of bytecode per training run.
    env = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        log.info("starting an embedded local Ray (%s CPUs)", num_cpus or os.cpu_count())
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
                 configure_logging=True, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
