"""Prometheus file-based service discovery: where a run's ``/metrics`` is, for a central server.

Why: on a cluster, rank 0 serves ``/metrics`` on whichever node the scheduler picked, and no
static scrape config can name it. Prometheus's ``file_sd_configs`` watches a directory of JSON
files; a run that serves writes one file there naming its ``host:port`` and labels (the job id
from ``SLURM_JOB_ID`` / ``TORCHELASTIC_RUN_ID``, the host), and removes it when it ends. The run
is not a target label: ``drift_monitor_run_info`` carries it, and the ``instance`` label that
Prometheus gives every series of the target (its ``host:port``) is the join key::

    drift_monitor_explained_variance * on(instance) group_left(run) drift_monitor_run_info

The directory is usually on a shared file system the Prometheus server also mounts::

    scrape_configs:
      - job_name: drift_monitor
        file_sd_configs:
          - files: ["/shared/prometheus/targets/*.json"]
            refresh_interval: 30s

The file is written atomically (a temporary name, then a rename), so the server never reads
half a file. Torch-free, like the rest of the exporters.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..textfiles import write_json_atomic

#: Environment variables that name the cluster job, first found wins.
JOB_ID_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def advertised_host(bound: str) -> str:
    """The address other machines reach a server bound to ``bound`` at: this host's name when it
    listens on every interface, else the address it is bound to."""
    return socket.getfqdn() if bound in ("0.0.0.0", "::", "") else bound


def target_labels() -> dict[str, str]:
    """Where this process runs: the host and the cluster job id when set. The labels of the
    file_sd target, and part of ``drift_monitor_run_info`` (the exporter sets them there too, so a
    static scrape or a push has them as well)."""
    labels = {"hostname": socket.gethostname()}
    job = next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v)), None)
    if job:
        labels["job_id"] = job
    return labels


def write_target(sd_dir: str | os.PathLike[str], host: str, port: int) -> Path:
    """Write ``<sd_dir>/drift_monitor-<host>-<port>.json`` for ``file_sd_configs`` and return its path."""
    directory = Path(sd_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"drift_monitor-{socket.gethostname()}-{port}")
    return write_json_atomic(directory / f"{name}.json",
                             [{"targets": [f"{advertised_host(host)}:{port}"], "labels": target_labels()}])


def remove_target(path: str | os.PathLike[str]) -> None:
    """Remove a target file (the run ended): Prometheus drops the target at its next refresh."""
    Path(path).unlink(missing_ok=True)
