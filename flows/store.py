"""Where a run keeps what its steps share besides artifacts: the run's *store*.

The store sits beside the Metaflow datastore the run uses — ``<datastore root>/.plantml/
<Flow>/<run id>`` — so it is on local disk for a local run and in S3 for
``--datastore s3``, and every step of the run (on any machine) reaches it the same way the
datastore is reached. The leading dot keeps it out of Metaflow's own listing of flows.
"""

from __future__ import annotations

from typing import Any

from metaflow import current

STORE_FOLDER = ".plantml"


def datastore_root(flow: Any) -> str:
    """The root of the datastore this task writes to (local folder or ``s3://`` prefix)."""
    ds = getattr(flow, "_datastore", None)
    root = getattr(getattr(ds, "_storage_impl", None), "datastore_root", None)
    if root:
        return str(root)
    from metaflow.metaflow_config import DATASTORE_SYSROOT_LOCAL  # pragma: no cover - outside a task

    return str(DATASTORE_SYSROOT_LOCAL or ".metaflow")


def run_store(flow: Any, run_id: str | None = None) -> str:
    """The store of run ``run_id`` (default: the current run)."""
    from plantml.storage import join

    return join(datastore_root(flow), STORE_FOLDER, current.flow_name, run_id or current.run_id)


def checkpoint_uris(flow: Any, model_name: str) -> tuple[str, list[str]]:
    """``(this run's epoch checkpoint, earlier runs' to continue from)`` for one branch.

    A retry of the task writes and finds the same file; a ``resume`` (a new run id) also
    looks in the run it resumes.
    """
    from plantml.storage import join

    name = f"checkpoints/{model_name}/last.pt"
    earlier = [join(run_store(flow, current.origin_run_id), name)] if current.origin_run_id else []
    return join(run_store(flow), name), earlier
