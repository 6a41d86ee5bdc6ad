"""Train a SATIC captioner: XE (or sequence-level KD labels) with Noam, then self-critical CIDEr-D (SPEC.md 4).

Stage 1:  python train.py --noamopt --noamopt_warmup 20000 ... --input_label_h5 data/cocotalk_seq-kd-..._label.h5
              --checkpoint_path save/sat-2-from-nsc-seqkd --id sat-2-from-nsc-seqkd --K 2
Stage 2:  (cd save && ./copy_model.sh sat-2-from-nsc-seqkd nsc-sat-2-from-nsc-seqkd), then
          python train.py ... --self_critical_after 10 --start_from save/nsc-sat-2-from-nsc-seqkd ... --K 2

Multi-GPU / multi-node: torchrun --nproc_per_node N train.py ... (each rank trains on its shard of the training
split; rank 0 validates, logs and writes checkpoints).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import models
from misc import optim
from misc.checkpoint import load_pickle, load_torch, save_checkpoint
from misc.errors import SaticError
from misc.eval_utils import eval_split
from misc.loss_wrapper import LossWrapper
from misc.utils import format_duration, resolve_device, to_device
from opts import parse_opt

# Options that must agree between a run and the checkpoint it resumes (the reference asserted the first four).
_MUST_MATCH = ('caption_model', 'rnn_size', 'num_layers', 'input_encoding_size', 'att_feat_size', 'K')


# ----------------------------------------------------------------------------------------------- set-up
def setup_distributed(opt):
    """(rank, world_size, device); initialises torch.distributed when launched by torchrun."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return 0, 1, resolve_device(opt.device)
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(opt.device)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def load_resume_state(opt, vocab):
    """infos and histories of --start_from (empty dicts without it), checked against this run's options."""
    if not opt.start_from:
        return {}, {}
    infos_path = os.path.join(opt.start_from, f'infos_{opt.id}.pkl')
    if not os.path.isfile(infos_path):
        raise SaticError(f"--start_from {opt.start_from}: no infos_{opt.id}.pkl there; --id must name the run "
                         f"saved in that folder (save/copy_model.sh renames it when you copy a run)")
    infos = load_pickle(infos_path)
    saved = infos['opt']
    for key in _MUST_MATCH:
        if hasattr(saved, key) and getattr(saved, key) != getattr(opt, key):
            raise SaticError(f"--{key} {getattr(opt, key)} disagrees with the checkpoint in {opt.start_from} "
                             f"(trained with {key}={getattr(saved, key)}): use the same value or another folder")
    if infos.get('vocab') is not None and infos['vocab'] != vocab:
        raise SaticError(f"the vocabulary of {infos_path} differs from {opt.input_json}: "
                         f"resume with the cocotalk.json the checkpoint was trained with")
    histories_path = os.path.join(opt.start_from, f'histories_{opt.id}.pkl')
    histories = load_pickle(histories_path) if os.path.isfile(histories_path) else {}
    return infos, histories


def build_model(opt, device):
    """The model, its weights from --start_from, or (SAT, K > 1) from the autoregressive --init_from."""
    model = models.setup(opt)
    if opt.start_from:
        path = os.path.join(opt.start_from, 'model.pth')
        models.check_state_dict(model, load_torch(path, 'model'), path)
    elif opt.K > 1 and opt.init_from and opt.init_from.lower() != 'none':
        if not os.path.isfile(opt.init_from):
            raise SaticError(f"--init_from {opt.init_from}: not found. SAT (K > 1) starts from an autoregressive "
                             f"checkpoint: train the transformer baseline first (README), or pass --init_from none")
        models.check_state_dict(model, load_torch(opt.init_from, 'model'), opt.init_from)
        print(f'initialised from the autoregressive checkpoint {opt.init_from}')
    return model.to(device)


def build_optimizer(model, opt):
    optimizer = optim.build(model, opt)
    path = os.path.join(opt.start_from or '', 'optimizer.pth')
    if opt.start_from and os.path.isfile(path):
        # reference quirk: the saved param_groups (betas, eps of a Noam stage 1 included) replace the new ones;
        # the lr is set again at the start of every epoch.
        optimizer.load_state_dict(load_torch(path, 'optimizer'))
    return optimizer


# ----------------------------------------------------------------------------------------------- loop pieces
def set_epoch_lr(optimizer, opt, epoch):
    """Plain optimisers get the step-decayed lr at each epoch start (Noam and plateau manage their own)."""
    if not opt.noamopt and not opt.reduce_on_plateau:
        optim.set_lr(optimizer, optim.step_decay_rate(epoch, opt))


def train_step(loss_wrapper, optimizer, batch, sc_flag, opt):
    """One optimisation step; returns {'loss': float, 'reward': float (self-critical only)}."""
    optimizer.zero_grad()
    with torch.autocast(batch['att_feats'].device.type, dtype=torch.bfloat16, enabled=bool(opt.bf16)):
        out = loss_wrapper(batch, sc_flag)
    out['loss'].backward()
    optim.clamp_gradients(loss_wrapper.parameters(), opt.grad_clip)
    optimizer.step()
    result = {'loss': float(out['loss'].detach())}
    if 'reward' in out:
        result['reward'] = float(out['reward'])
    return result


def validate(model, loader, crit, opt, device):
    """Greedy decoding of val_images_use val images; returns (val_loss, predictions, lang_stats, score)."""
    kwargs = dict(vars(opt), split='val', num_images=opt.val_images_use, verbose=False, sample_max=1,
                  seq_kd=False, dump_path=0)
    val_loss, predictions, lang_stats, _ = eval_split(model, loader, kwargs, crit=crit, device=device)
    score = lang_stats['CIDEr'] if lang_stats else (-val_loss if val_loss is not None else 0.0)
    return val_loss, predictions, lang_stats, score


class ProgressLine:
    """A periodic line: iteration, epoch, loss or reward, lr, it/s, ETA."""

    def __init__(self, start_iter, total_iters):
        self.start_iter, self.total_iters = start_iter, total_iters
        self.t0 = time.time()

    def __call__(self, iteration, epoch, stats, lr):
        rate = (iteration - self.start_iter) / max(time.time() - self.t0, 1e-9)
        eta = format_duration((self.total_iters - iteration) / rate) if self.total_iters and rate > 0 else '?'
        what = f"reward {stats['reward']:.4f} loss {stats['loss']:.4f}" if 'reward' in stats else f"loss {stats['loss']:.4f}"
        print(f'iter {iteration} (epoch {epoch}) {what} lr {lr:.3g} {rate:.2f} it/s ETA {eta}', flush=True)


# ----------------------------------------------------------------------------------------------- main
def train(opt):
    from dataloader import DataLoader
    rank, world_size, device = setup_distributed(opt)
    is_main = rank == 0
    torch.manual_seed(opt.seed + rank)
    loader = DataLoader(opt, rank=rank, world_size=world_size)
    opt.vocab_size, opt.seq_length = loader.vocab_size, loader.seq_length
    infos, histories = load_resume_state(opt, loader.get_vocab())
    if infos.get('iterators') is not None and infos.get('split_ix') is not None:
        loader.load_state_dict({'iterators': infos['iterators'], 'split_ix': infos['split_ix']})
    if opt.language_eval and is_main:
        from misc.eval_utils import check_language_eval_ready
        check_language_eval_ready(opt.ref_json)

    model = build_model(opt, device)
    loss_wrapper = LossWrapper(model, opt)
    trainer = loss_wrapper
    if world_size > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(
            loss_wrapper, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = build_optimizer(model, opt)

    iteration, epoch = infos.get('iter', 0), infos.get('epoch', 0)
    best_val_score = infos.get('best_val_score') if opt.load_best_score else None
    val_result_history = histories.get('val_result_history', {})
    loss_history = histories.get('loss_history', {})
    lr_history = histories.get('lr_history', {})
    ss_prob_history = histories.get('ss_prob_history', {})
    writer = None
    if is_main:
        os.makedirs(opt.checkpoint_path, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(opt.checkpoint_path)

    iters_per_epoch = math.ceil(len(loader.split_ix['train']) / (opt.batch_size * world_size))
    total = opt.max_epochs * iters_per_epoch if opt.max_epochs > 0 else 0
    if opt.max_iters > 0:
        total = min(total, opt.max_iters) if total else opt.max_iters
    progress = ProgressLine(iteration, total)

    def snapshot(best=False):
        infos_now = {'iter': iteration, 'epoch': epoch, **loader.state_dict(), 'vocab': loader.get_vocab(),
                     'opt': argparse.Namespace(**vars(opt)), 'best_val_score': best_val_score}
        histories_now = {'val_result_history': val_result_history, 'loss_history': loss_history,
                         'lr_history': lr_history, 'ss_prob_history': ss_prob_history}
        history_iter = iteration if opt.save_history_ckpt else None
        save_checkpoint(opt.checkpoint_path, opt.id, model, optimizer, infos_now, histories_now, best, history_iter)

    def validate_and_save():
        nonlocal best_val_score
        val_loss, predictions, lang_stats, score = validate(model, loader, loss_wrapper.crit, opt, device)
        if opt.reduce_on_plateau and val_loss is not None:
            optimizer.scheduler_step(val_loss)
        if val_loss is not None:
            writer.add_scalar('validation loss', val_loss, iteration)
        for metric, value in (lang_stats or {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(metric, value, iteration)
        val_result_history[iteration] = {'loss': val_loss, 'lang_stats': lang_stats, 'predictions': predictions}
        best = best_val_score is None or score > best_val_score
        if best:
            best_val_score = score
        snapshot(best)
        shown = f"CIDEr {lang_stats['CIDEr']:.4f}" if lang_stats else f'val loss {val_loss:.4f}'
        print(f"validation at iter {iteration}: {shown}{' (best so far)' if best else ''}; "
              f"checkpoint written to {opt.checkpoint_path}", flush=True)

    epoch_done, last_saved = True, iteration
    sc_flag = False
    try:
        while True:
            if epoch_done:
                set_epoch_lr(optimizer, opt, epoch)
                sc_flag = opt.self_critical_after != -1 and epoch >= opt.self_critical_after
                epoch_done = False
            if (opt.max_epochs != -1 and epoch >= opt.max_epochs) or (opt.max_iters > 0 and iteration >= opt.max_iters):
                break
            batch = to_device(loader.get_batch('train'), device)
            stats = train_step(trainer, optimizer, batch, sc_flag, opt)
            iteration += 1
            if batch['bounds']['wrapped']:
                epoch += 1
                epoch_done = True
            if is_main and iteration % opt.losses_log_every == 0:
                lr = optim.get_lr(optimizer)
                progress(iteration, epoch, stats, lr)
                writer.add_scalar('train_loss', stats['loss'], iteration)
                writer.add_scalar('learning_rate', lr, iteration)
                if 'reward' in stats:
                    writer.add_scalar('avg_reward', stats['reward'], iteration)
                loss_history[iteration] = stats['reward'] if sc_flag else stats['loss']
                lr_history[iteration] = lr
                ss_prob_history[iteration] = 0.0
            if iteration % opt.save_checkpoint_every == 0:
                if is_main:
                    validate_and_save()
                last_saved = iteration
                if world_size > 1:
                    dist.barrier()
        if iteration != last_saved:  # (ours) the final weights are always validated and saved
            if is_main:
                validate_and_save()
            if world_size > 1:
                dist.barrier()
    except (KeyboardInterrupt, RuntimeError):
        if is_main and iteration > 0:
            print('interrupted: saving a checkpoint before exiting', file=sys.stderr)
            snapshot()
        raise
    finally:
        loader.close()
        if writer is not None:
            writer.close()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return {'iter': iteration, 'epoch': epoch, 'best_val_score': best_val_score}


def main(argv=None):
    opt = parse_opt(argv)
    try:
        train(opt)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
