"""The process layout of a run on DeviceMeshes (DESIGN 10), built identically on every rank.

Ranks form `dp` expert-parallel (EP) groups of `ep_size` consecutive ranks, so the 2-D expert
mesh is (edp, ep) = (dp, ep_size) in row-major rank order: a row is an EP group (the all-to-all),
a column holds the replicas of one block of experts (their gradient reduction, and their FSDP
shards). The dense parts are sharded over a 1-D mesh of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_ray.parallel.placement import ExpertPlacement


@dataclass
class ParallelMesh:
    dense: DeviceMesh  # 1-D over every rank
    experts: DeviceMesh  # 2-D ("edp", "ep")

    @property
    def ep(self):
        """This rank's expert-parallel process group (the all-to-all)."""
        return self.experts["ep"].get_group()

    @property
    def edp(self) -> DeviceMesh:
        """The replicas of this rank's experts (1-D)."""
        return self.experts["edp"]

    @property
    def replicas(self):
        """The replicas' process group, or None when every expert exists once (dp == 1)."""
        return self.edp.get_group() if self.edp.size() > 1 else None


def build_mesh(placement: ExpertPlacement, device_type: str) -> ParallelMesh:
    """Every rank must call this, in the same order: it creates process groups (collective)."""
    experts = init_device_mesh(device_type, (placement.dp_size, placement.ep_size), mesh_dim_names=("edp", "ep"))
    dense = init_device_mesh(device_type, (placement.world_size,), mesh_dim_names=("dp",))
    return ParallelMesh(dense=dense, experts=experts)
