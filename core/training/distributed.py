"""The distributed set-up of `mk tune` under `torchrun` / `accelerate launch`.

`Dist` says which process this is (RANK, WORLD_SIZE, LOCAL_RANK from the
environment), joins and leaves the process group, and wraps the collectives the
training loop needs so that on a single process they are identities: the loop
reads the same whether it runs alone or under DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mk.core.errors import MkError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), world=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    # -- the process group ----------------------------------------------------

    def init(self, device: str) -> str:
        """Join the process group; the device this process trains on (its own GPU on CUDA)."""
        import torch

        if self.active:
            if device.startswith("cuda"):
                device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(device)
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return device

    def destroy(self) -> None:
        import torch

        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def wrap(self, model, device: str):
        """The model under DDP on several processes, the model itself on one."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device] if device.startswith("cuda") else None)

    # -- collectives (identities on one process) -------------------------------

    def barrier(self) -> None:
        if self.active:
            import torch

            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.active:
            return [obj]
        import torch

        every = [None] * self.world
        torch.distributed.all_gather_object(every, obj)
        return every

    def from_main(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch

        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        if self.active:
            import torch

            torch.distributed.all_reduce(tensor)


def check_ranks_agree(dist: Dist, model, log) -> None:
    """Every rank must end with the same weights; a fingerprint of them says so."""
    import torch

    with torch.no_grad():
        mine = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                            for p in model.parameters()]).flatten()
    every = [torch.zeros_like(mine) for _ in range(dist.world)]
    torch.distributed.all_gather(every, mine)
    agree = all(torch.equal(e.cpu(), every[0].cpu()) for e in every)
    log.write("ranks", world_size=dist.world, agree=agree, fingerprints=[float(e.sum()) for e in every])
    if not agree:
        raise MkError(f"the {dist.world} processes ended with different weights",
                      hint="report this; rerun on one process meanwhile")
