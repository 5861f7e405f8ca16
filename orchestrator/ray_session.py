"""The Ray session Keel runs in: an embedded local cluster (tuned for fast start-up) or a cluster's address.
Used by runs, sweeps, the stress suite, `keel check`, the pytest plugin and the benchmarks."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

# Ray settings that cut start-up and shutdown of an embedded local cluster (see benchmarks/startup.py):
# the controller polls its workers every 0.1 s instead of 2 s (a tiny fit 18 s -> 10 s), and local runs
# skip what only a cloud cluster needs: the spot-preemption watcher and usage-stats reporting. Ray's log
# monitor re-lists the log directory every 0.1 s until it holds 1,000 files, then every 0.5 s; a long session
# (a sweep, a test suite) makes hundreds, so it lists every 0.5 s from the start (measured: 800 files, idle,
# 1.8 -> 0.8 CPU-s a minute; a new worker's log is picked up at most 0.5 s later).
FAST_LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                  "RAY_USAGE_STATS_ENABLED": "0", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}


_started_here: Optional[str] = None  # the GCS address of the embedded local Ray this process started, if any

PIN_ADDRESS = {"worker_process_setup_hook": "orchestrator.ray_session.pin_cluster_address"}  # see pin_cluster_address


def free_dashboard_port(preferred: int = 8265) -> int:
    """Ray's default dashboard port if it is free, else any free port (preferred=0: any, at once).
    Free now is not free at bind time: ensure_ray retries when another Ray took it meanwhile."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    return preferred


def cluster_address(address: Optional[str]) -> Optional[str]:
    """The cluster to join: `scaling.address`, else $RAY_ADDRESS (inside a Ray Job, its cluster), else None
    (start an embedded local Ray). An http(s):// RAY_ADDRESS is a dashboard / Jobs API address, set for
    `keel submit`; a local `keel run` must not try to join it."""
    env = os.environ.get("RAY_ADDRESS") or None
    if env and env.startswith(("http://", "https://")):
        env = None
    return address or env


# Ray starts one idle worker process per CPU when the first driver connects, for the actors and tasks to
# come. A run that trains in this process (train/in_process.py) needs none of them at once, and on 2 cores
# their start competes with its own: measured, the smallest 1-worker job's first step 12.4-12.9 s with them,
# 11.3-11.9 s without (3 rounds interleaved); a 2-worker run's actors use them (25.2-25.5 s with, 25.6-27.1 without).
NO_PRESTART = {"RAY_prestart_worker_first_driver": "0"}


def _not_the_bars_notice(record) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def _not_the_token_notice(record) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def refused_token(exc: BaseException) -> bool:
    """Whether a failed ray.init was the cluster refusing a missing or wrong token (anywhere in the chain)."""
    while exc is not None:
        if "InvalidAuthToken" in str(exc) or type(exc).__name__ == "AuthenticationError":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_reachable(address: str, named_by: str) -> None:
    """A cluster address that answers, or one line naming where it came from. ray.init itself kept retrying
    one for over 5 minutes (measured), printing GCS errors; `auto` with no cluster raises a traceback."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    from orchestrator.errors import BadInput

    if "://" in address:  # ray://, a client address: ray.init's own errors
        return
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise BadInput(f"{named_by}: {address}: {str(exc).splitlines()[0]} (leave it unset for a local Ray)") from None
    tried = []
    for candidate in dict.fromkeys([address, resolved]) if address != "auto" else [resolved]:
        host, _, port = candidate.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            return
        except (OSError, ValueError) as exc:
            tried.append(f"{candidate}: {getattr(exc, 'strerror', None) or exc}")
    raise BadInput(f"{named_by}: {address}: no Ray cluster answers there ({'; '.join(tried)})")


def ensure_ray(address: Optional[str], verbose: bool = False, dashboard: bool = True, prestart_workers: bool = True) -> None:
    global _started_here  # set when this call starts the embedded Ray (see in_embedded_ray)
    import ray

    if ray.is_initialized():
        return
    named_by = "scaling.address" if address else "RAY_ADDRESS"
    address = cluster_address(address)
    if address is None:
        for key, value in FAST_LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        # Embedded local cluster; dashboard/job API stay on 127.0.0.1 (Ray's default). Sweeps need the
        # dashboard: its State API is how Ray frees a Tune-stopped trial's workers (measured: with port 8265
        # taken by another Ray, no dashboard started, and the next trial waited forever for CPUs). A single
        # `keel run` does not need it (`keel run --dashboard` to watch it); start-up is the same either way.
        port = free_dashboard_port() if dashboard else None
        if not verbose:  # Ray 2.60 starts every local cluster with token authentication and says so each time
            import logging
            token_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
            if _not_the_token_notice not in token_logger.filters:
                token_logger.addFilter(_not_the_token_notice)
        lean = {k: v for k, v in NO_PRESTART.items() if k not in os.environ} if not prestart_workers else {}
        os.environ.update(lean)  # read by the raylet as it starts; not left for a later Ray of this process
        try:
            for attempt in range(3):
                try:
                    ray.init(log_to_driver=verbose, configure_logging=verbose, logging_level="WARNING",
                             include_dashboard=dashboard, dashboard_port=port, runtime_env=PIN_ADDRESS)
                    break
                except Exception as exc:  # another Ray starting beside this one took the port between check and bind
                    taken = "valid port for dashboard" in str(exc) or "already occupied" in str(exc)
                    if not taken or attempt == 2:
                        raise
                    ray.shutdown()
                    port = free_dashboard_port(preferred=0)
        finally:
            for key in lean:
                os.environ.pop(key, None)
        _started_here = ray.get_runtime_context().gcs_address
    else:
        check_reachable(address, named_by)
        # A submitted job's own runtime env is merged with this one; a setup hook of the user's own wins.
        own_hook = "worker_process_setup_hook" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
        try:
            ray.init(address=address, log_to_driver=verbose, logging_level="WARNING",
                     runtime_env=None if own_hook else PIN_ADDRESS)
        except Exception as exc:  # a ConnectionError, caused by a RuntimeError around Ray's AuthenticationError
            if not refused_token(exc):
                raise
            from orchestrator.errors import BadInput
            # Ray sends this machine's token to an address named explicitly only when told to: not Keel's call
            raise BadInput(f"{named_by}: {address}: the cluster uses token authentication: set RAY_AUTH_MODE=token "
                           "and put its token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
    import logging

    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Ray Data warns, once per process, that the bars Keel turned off are off (a 1-worker run, which
        # reads its data in this process, printed it between Keel's own lines)
        progress_logger = logging.getLogger("ray.data._internal.progress")
        if _not_the_bars_notice not in progress_logger.filters:
            progress_logger.addFilter(_not_the_bars_notice)


def in_embedded_ray() -> bool:
    """Whether this process runs on the local Ray it started itself, which ends when this process does."""
    import ray

    return ray.is_initialized() and _started_here == ray.get_runtime_context().gcs_address


def beside_the_driver() -> dict:
    """Actor options for the driver's own helper (the run channel): no CPU, and on the driver's
    node. Placed anywhere, the helpers died with whatever node Ray put them on: a run that survived the loss of a
    worker node then lost its metrics (seen: the run finished with 2 of 6 epochs in metrics.jsonl)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def pin_cluster_address() -> None:
    """Every worker of a Keel job names its own cluster in RAY_ADDRESS (a worker setup hook). Ray's own
    helpers inside the cluster look their cluster up with address "auto", which fails, or picks the newest
    `ray start` cluster, when a second Ray runs on the machine ("Found multiple active Ray instances"):
    Ray Train's placement-group cleaner then never removed a Tune-stopped trial's placement group and the
    next trial waited forever for its CPUs (a sweep beside the test suite's own Ray), and an elastic run
    read another cluster's resources and never grew (two `ray start` clusters on one machine)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


_spare_channels: list = []  # (cluster, channel) that finished runs of this process gave back


def borrow_run_channel():
    """A run channel for one run: a spare one an earlier run of this process gave back (emptied), else a new
    one. Each new actor is a process start on the run's critical path (measured: ~1.8 CPU-s of a 31 CPU-s
    one-epoch fit on 2 cores), and the test suite, `keel stress` and `keel check` run many runs per process."""
    import ray

    cluster = ray.get_runtime_context().gcs_address
    while _spare_channels:
        owner, channel = _spare_channels.pop()
        if owner != cluster:
            continue  # a channel of a Ray this process has shut down since
        try:
            ray.get(channel.reset.remote(), timeout=10)
            return channel
        except Exception:  # gone (its node, or the session, ended): open a new one
            continue
    return open_run_channel()


def give_back_run_channel(channel, reusable: bool = True) -> None:
    """Keep a finished run's channel for the next run of this process; `reusable=False` (someone may
    still read from it) ends it instead."""
    import ray

    if reusable:
        _spare_channels.append((ray.get_runtime_context().gcs_address, channel))
    else:
        ray.kill(channel)


def open_run_channel():
    """A run's one helper actor, beside the driver: events to the driver (rank 0's progress, a sweep trial's
    reports), taken in order, and the epoch clock that Ray Data's per-epoch stage reads (the stage cannot know
    the epoch otherwise). One actor, not a ray.util.queue.Queue plus a clock: each actor is a new process on
    the run's critical path (measured: the Train controller started ~1.3 s later while two were starting)."""
    import ray

    # A plain (not async) actor on purpose: Ray runs one caller's calls to it in the order they were made,
    # which it does not promise for async or threaded actors (measured: three fire-and-forget puts, then a
    # take, to an async version: the take ran before the third put). So takes do not wait; callers poll.
    @ray.remote
    class RunChannel:
        def __init__(self):
            self.events: list = []
            self.epoch = 0

        def put(self, event) -> None:
            self.events.append(event)

        def take(self) -> list:
            """Every event put so far, in the order each caller put them."""
            events, self.events = self.events, []
            return events

        def set(self, epoch: int) -> None:
            self.epoch = epoch

        def get(self) -> int:
            return self.epoch

        def reset(self) -> None:
            self.events, self.epoch = [], 0

    return RunChannel.options(**beside_the_driver()).remote()


def follow_channel(channel, done: Callable[[], bool], handle: Callable[[Any], None], poll_s: float) -> None:
    """Hand every event put on a run channel to `handle`, in order, until `done()` and nothing is left."""
    import time

    import ray

    while True:
        finished = done()  # read first: whatever was put before done() turned true is in this take
        events = ray.get(channel.take.remote())
        for event in events:
            handle(event)
        if finished:
            return
        if not events:
            time.sleep(poll_s)
