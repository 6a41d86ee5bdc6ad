"""One optimisation step of training (train.py's loop, bench/train_speed.py): forward under autocast, backward,
the non-finite guard, the element-wise clamp, the update; and the precision switches it runs under."""
import math

import torch
import torch.distributed as dist

from misc.train import optim
from misc.utils import autocast


def precision(tf32, fp16, device):
    """--tf32 (CUDA matrix products and convolutions, on a CUDA device) and, with --fp16, the gradient scaler
    (docs/speed.md, "Several GPUs"); returns the torch.amp.GradScaler or None."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
    return torch.amp.GradScaler(device.type) if fp16 else None


def train_step(loss_module, optimizer, batch, sc_flag, config, stop=False, world_size=1, scaler=None):
    """One optimisation step -> {'loss': float, 'reward': float (self-critical only), 'rank_loss': float,
    'skipped': bool, 'stop': bool, 'overflow': the loss scale (--fp16 gradient overflows only)}.

    loss_module: the LossWrapper (or a module like it: batch, sc_flag -> {'loss'[, 'reward']}), or the
    DistributedDataParallel around it (which averages the gradients over ranks during backward, before the
    element-wise clamp); batch: a DataLoader batch on the module's device (train.py's or bench's); config: a
    StepConfig (bf16, fp16, grad_clip); scaler: --fp16's torch.amp.GradScaler.
    Non-finite guard (ours): the loss and the largest |gradient| (one fused reduction over every gradient, NaN
    propagating, before the clamp hides an inf) decide whether the update runs; 'skipped' when it did not. With
    --fp16 the gradients are unscaled first, and after a skip the scaler backs off as GradScaler.step would have;
    a skip with a finite loss is a gradient overflow ('overflow'). With several ranks the loss and reward are
    averaged over them (rank_loss: this rank's) and the flags combined in one all-reduce: every rank skips and
    stops (`stop`: a signal asked this rank to stop) at the same iteration. One host synchronisation per step."""
    optimizer.zero_grad()
    with autocast(batch['att_feats'].device.type, config.bf16, config.fp16):
        out = loss_module(batch, sc_flag)
    loss = out['loss']
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for the guard and the clamp
    params = [p for p in loss_module.parameters() if p.grad is not None]
    numbers = step_numbers(loss, params, out.get('reward', 0.0), stop, world_size)
    if not numbers['nonfinite']:
        optim.clamp_gradients(params, config.grad_clip)
        optimizer.step()  # (not scaler.step: the guard has decided, without GradScaler's own host read)
    result = {'loss': numbers['loss'], 'rank_loss': numbers['rank_loss'], 'skipped': numbers['nonfinite'],
              'stop': numbers['stop']}
    if 'reward' in out:
        result['reward'] = numbers['reward']
    if scaler is not None:
        if numbers['nonfinite'] and not numbers['loss_nonfinite']:
            result['overflow'] = scaler.get_scale()  # (a host read, on overflows only)
        scaler.update()
    return result


def step_numbers(loss, params, reward, stop, world_size):
    """What a step reads on the host, in one transfer: {'loss', 'reward': means over the ranks; 'rank_loss': this
    rank's loss; 'nonfinite': the loss or a gradient is not finite on some rank; 'loss_nonfinite': the loss is not,
    on some rank; 'stop': some rank was asked to stop}."""
    worst = loss.detach().float().abs().reshape(1)
    if params:
        norms = torch._foreach_norm([p.grad for p in params], math.inf)
        worst = torch.cat([worst, torch.stack([n.float() for n in norms])])
    scalar = lambda value: torch.full((), float(value), dtype=torch.float64, device=loss.device)  # noqa: E731
    numbers = torch.stack([loss.detach().double(), scalar(reward), (~torch.isfinite(worst.max())).double(),
                           (~torch.isfinite(loss.detach())).double(), scalar(stop)])  # (5,)
    local_loss = numbers[0].clone()
    if world_size > 1:
        dist.all_reduce(numbers)  # sum: loss and reward / world_size are the means; a flag > 0: some rank raised it
        numbers[:2] /= world_size
    values = torch.cat([numbers, local_loss.reshape(1)]).tolist()  # the one host synchronisation of a step
    return {'loss': values[0], 'reward': values[1], 'nonfinite': values[2] > 0, 'loss_nonfinite': values[3] > 0,
            'stop': values[4] > 0, 'rank_loss': values[5]}
