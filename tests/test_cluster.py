"""Node-limited routing on a real 2-node Ray cluster (ray.cluster_utils.Cluster)."""

import pytest
from conftest import REPLICATED, tiny_job

from moe_ray.runtime.cluster import join
from moe_ray.runtime.driver import run_job


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # One CPU per node: the two 1-CPU workers must land on different nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    join(cluster.address, log_to_driver=False)  # the --address path: a live address passes its check
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_node_limited_routing_keeps_tokens_on_one_node(two_node_cluster, tmp_path):
    job = tiny_job(
        tmp_path,
        model__moe={"n_routed_experts": 16, "expert_hidden": 16, "top_k": 4, "max_nodes_per_token": 1},
        train__steps=4,
        **REPLICATED,
    )
    result = run_job(job, run_name="nodes")
    placement = [e for e in result.progress.events if e.get("event") == "placement"][0]
    assert "on 2 node(s)" in placement["detail"]
    spread = [m["max_nodes_per_token"] for m in result.progress.metrics]
    assert len(spread) == 4 and max(spread) == 1, spread
