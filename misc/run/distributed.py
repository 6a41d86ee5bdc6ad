"""torch.distributed for train.py: the process group torchrun asks for, and the few collectives a run uses
(docs/speed.md, "Several GPUs"). With one process every function here is a plain local call.

A failure on one rank must not leave the others waiting in a collective until the process-group timeout: the
steps that can fail on some ranks only (the validation, rank 0's metrics and saves) run through `run_everywhere` /
`run_on_main`, which tell every rank about a failure so that every rank raises.
"""
import dataclasses
import datetime
import gc
import importlib
import os

import torch
import torch.distributed as dist

from misc.errors import SaticError
from misc.run.interrupts import Interrupted
from misc.utils import resolve_device


class PeerFailed(SaticError):
    """Another rank failed in a step every rank takes part in; its own error is printed by that rank."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the run: its rank among `size` processes, and its device."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        """Rank 0: it computes the COCO metrics, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1


def setup_distributed(device_name='', timeout_minutes=60):
    """This process's World on device_name (--device; '' or 'auto': cuda when available); initialises
    torch.distributed when launched by torchrun (WORLD_SIZE > 1), with timeout_minutes (--dist_timeout_minutes) as
    the timeout of every collective (a rank that never arrives fails the others then)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return World(0, 1, resolve_device(device_name))
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # (a caller may have initialised it already)
        importlib.import_module('torch.distributed.nn.functional')  # torch quirk: before init (see shutdown)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank, world_size, device)


def shutdown():
    """Destroy the process group, joining gloo's worker threads; the caller drops the DistributedDataParallel
    wrapper first (its reducer holds the group too). A group still alive when the interpreter exits can abort the
    process ('terminate called without an active exception', SIGABRT) after a successful run: a worker thread that
    frees a finished collective's tensors needs the GIL, which finalisation no longer grants.

    torch quirk: torch.distributed.nn.functional binds group.WORLD as a default argument when first imported, and
    DistributedDataParallel imports it; imported after init_process_group, it holds the group for ever. So
    setup_distributed imports it first, while group.WORLD is still None."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # (a reference cycle through the wrapper would keep its reducer)
        dist.destroy_process_group()


def all_gather_objects(obj, world):
    """[obj of every rank] (a collective: every rank calls it)."""
    if not world.distributed:
        return [obj]
    every = [None] * world.size
    dist.all_gather_object(every, obj)
    return every


def broadcast_object(obj, world, src=0):
    """rank src's obj, on every rank (a collective)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _failure(error):
    """What the other ranks learn about an error: ('interrupt', signum) or ('error', one line)."""
    if isinstance(error, KeyboardInterrupt):
        return 'interrupt', getattr(error, 'signum', 2)
    return 'error', f'{type(error).__name__}: {error}' if not isinstance(error, SaticError) else str(error)


def _raise_peer(world, rank, failure, what):
    kind, detail = failure
    if kind == 'interrupt':
        raise Interrupted(detail)
    raise PeerFailed(f'rank {rank} failed in {what}: {detail}' if rank != world.rank else detail)


def run_everywhere(fn, world, what):
    """fn() on every rank; when it raises on some rank, every rank raises: that rank its own error, the others
    PeerFailed naming it (Interrupted when it was a Ctrl-C). One collective after fn."""
    try:
        value, failure = fn(), None
    except BaseException as error:  # (KeyboardInterrupt included: the others must not wait for this rank)
        if not world.distributed:
            raise
        value, failure, own = None, _failure(error), error
    failures = all_gather_objects(failure, world) if world.distributed else [None]
    if failure is not None:
        raise own
    for rank, peer in enumerate(failures):
        if peer is not None:
            _raise_peer(world, rank, peer, what)
    return value


def run_on_main(fn, world, what):
    """fn() on rank 0, its value broadcast to every rank; when it raises, rank 0 re-raises and the others raise
    PeerFailed with its message (Interrupted for a Ctrl-C). One collective after fn."""
    if not world.distributed:
        return fn()
    value = failure = own = None
    if world.is_main:
        try:
            value = fn()
        except BaseException as error:
            failure, own = _failure(error), error
    failure, value = broadcast_object((failure, value), world)
    if own is not None:
        raise own
    if failure is not None:
        _raise_peer(world, 0, failure, what)
    return value
