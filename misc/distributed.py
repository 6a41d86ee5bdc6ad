"""torch.distributed for train.py: the process group torchrun asks for, and the few collectives a run uses
(README, "Several GPUs"). With one process every function here is a plain local call.
"""
import dataclasses
import os

import torch
import torch.distributed as dist

from misc.utils import resolve_device


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the run: its rank among `size` world, and its device."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        """Rank 0: it validates the metrics, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1


def setup_distributed(opt):
    """This process's World; initialises torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return World(0, 1, resolve_device(opt.device))
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(opt.device)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # (a caller may have initialised it already)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return World(rank, world_size, device)


def shutdown(world):
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world):
    if world.distributed:
        dist.barrier()


def all_gather_objects(obj, world):
    """[obj of every rank] (a collective: every rank calls it)."""
    if not world.distributed:
        return [obj]
    every = [None] * world.size
    dist.all_gather_object(every, obj)
    return every
