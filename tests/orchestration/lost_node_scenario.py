"""A trial whose result is lost with its node, on a real two-node Ray cluster on this machine.

Run as `python -m tests.orchestration.lost_node_scenario TRACKING_URI` (the fault tests run it in a
subprocess, so that its Ray cluster does not meet the session's `ray_local`). The head node has no CPUs, so
the seed's actor runs on the worker node. Once the actor has returned a chunk's result (kept in that
node's object store), the node is removed before the driver fetches the result, and a fresh node joins.
The runner must restart the seed from its last checkpoint on the new node. Prints one JSON line with what
happened.
"""

from __future__ import annotations

import json
import logging
import sys

import ray
from ray.cluster_utils import Cluster

from labfleet.orchestration.recorder import MlflowRecorder
from labfleet.orchestration.runner import TrialRunner, drive
from labfleet.spec.loading import load_spec
from labfleet.tracking.runs import Tracker
from tests.conftest import EXPERIMENTS


def main(tracking_uri: str) -> None:
    # Every return value stays in the object store of the node that made it, as a large result (one
    # with a checkpoint) does; a small one would go straight to the driver and survive its node.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"max_direct_call_object_size": 0}})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    try:
        spec = load_spec(EXPERIMENTS / "cartpole_reinforce.yaml",
                         # (long enough that the first checkpoint's chunk is never the last on a fast CPU)
                         {"seeds": [3], "budget.env_steps": 49152, "eval": {"episodes": 2, "every_steps": 4096}})
        tracker = Tracker(tracking_uri)
        recorder = MlflowRecorder(tracker)
        runner = TrialRunner(spec, [recorder], chunk_seconds=0.2)
        runner.start()
        state = runner.seeds[3]
        while state.checkpoint is None:  # up to the first checkpoint, as usual
            ray.wait([state.future], timeout=60)
            runner.on_result(state)
        checkpoint_progress = state.progress
        ready, _ = ray.wait([state.future], timeout=60, fetch_local=False)  # done on the worker node...
        assert ready, "no result in 60 s"
        cluster.remove_node(worker)  # ...which dies before the driver fetched the result
        cluster.add_node(num_cpus=1)
        runner.on_result(state)
        relaunched = state.retries
        drive([runner])
        tracker.close()
        same = True
        try:  # exact resume: the seed ends with the network of a fault-free run of it
            from tests.orchestration.test_faults import _assert_same_model_as_a_fault_free_run

            _assert_same_model_as_a_fault_free_run(spec, 3, state.checkpoint)
        except AssertionError:
            same = False
        print(json.dumps({"checkpoint_progress": checkpoint_progress, "retries_after_loss": relaunched,
                          "same_model_as_fault_free": same,
                          "seed_status": state.status, "trial_status": runner.status, "error": state.error,
                          "run_id": recorder.seed_run_id(runner, state.seed),
                          "trial_run_id": recorder.trial_run_id(runner)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
