"""Train a SATIC captioner: XE (or sequence-level KD labels) with Noam, then self-critical CIDEr-D (SPEC.md 4).

Stage 1:  python train.py --noamopt --noamopt_warmup 20000 ... --input_label_h5 data/cocotalk_seq-kd-..._label.h5
              --checkpoint_path save/sat-2-from-nsc-seqkd --id sat-2-from-nsc-seqkd --K 2
Stage 2:  (cd save && ./copy_model.sh sat-2-from-nsc-seqkd nsc-sat-2-from-nsc-seqkd), then
          python train.py ... --self_critical_after 10 --start_from save/nsc-sat-2-from-nsc-seqkd ... --K 2

Multi-GPU / multi-node: torchrun --nproc_per_node N train.py ... (each rank trains on its shard of the training
split, DistributedDataParallel averages the gradients; rank 0 validates, logs and writes checkpoints).
"""
import argparse
import math
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import models
from misc import optim
from misc.checkpoint import (CheckpointError, check_infos_match, check_writable_dir, load_pickle, load_torch,
                             recover_checkpoint, save_checkpoint)
from misc.errors import SaticError
from misc.evaluation import evaluate
from misc.loss_wrapper import LossWrapper
from misc.utils import format_duration, resolve_device, to_device
from opts import parse_opt

# Options that must agree between a run and the checkpoint it resumes (the reference asserted the first three).
# (ours) Consecutive iterations with a non-finite loss or gradient (each skipped) after which training stops.
NONFINITE_STOP = 5
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
    if not dist.is_initialized():  # (a caller may have initialised it already)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def effective_k(opt):
    """K of the model an opt builds: 'transformer' is K = 1 whatever --K says (reference infos may say otherwise)."""
    return 1 if getattr(opt, 'caption_model', 'sat') == 'transformer' else getattr(opt, 'K', 1)


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
        ours, theirs = (effective_k(opt), effective_k(saved)) if key == 'K' else \
            (getattr(opt, key), getattr(saved, key, getattr(opt, key)))
        if ours != theirs:
            raise SaticError(f"--{key} {ours} disagrees with the checkpoint in {opt.start_from} "
                             f"(trained with {key}={theirs}): use the same value or another folder")
    if infos.get('vocab') is not None and infos['vocab'] != vocab:
        raise SaticError(f"the vocabulary of {infos_path} differs from {opt.input_json}: "
                         f"resume with the cocotalk.json the checkpoint was trained with")
    histories_path = os.path.join(opt.start_from, f'histories_{opt.id}.pkl')
    histories = load_pickle(histories_path) if os.path.isfile(histories_path) else {}
    return infos, histories


def check_data(opt, loader):
    """Training needs captions, and the model's input size must be the features' (not a shape error later)."""
    if loader.labels is None:
        raise SaticError("training needs captions: --input_label_h5 none is for evaluating caption-less images")
    if not loader.split_ix['val']:
        raise SaticError(f"{opt.input_json} has no val images: training validates on them at every checkpoint")
    loader.check_att_feat_size(opt.att_feat_size, '--att_feat_size')


def build_model(opt, device):
    """The model, its weights from --start_from, or (SAT, K > 1) from the autoregressive --init_from."""
    model = models.setup(opt)
    if opt.start_from:
        path = os.path.join(opt.start_from, 'model.pth')
        models.load_weights(model, load_torch(path, 'model'), path)
    elif opt.K > 1 and opt.init_from and opt.init_from.lower() != 'none':
        if not os.path.isfile(opt.init_from):
            raise SaticError(f"--init_from {opt.init_from}: not found. SAT (K > 1) starts from an autoregressive "
                             f"checkpoint: train the transformer baseline first (README), or pass --init_from none")
        models.load_weights(model, load_torch(opt.init_from, 'model'), opt.init_from)
        print(f'initialised from the autoregressive checkpoint {opt.init_from}')
    model = model.to(device)
    if getattr(opt, 'compile', 0):  # (ours) opt-in: compiled on the first iterations (README, "Speed options")
        from models.speed import compile_model
        compile_model(model)
    return model


def build_teacher(opt, vocab, device):
    """The frozen --teacher_model of word-level distillation (--kd_weight > 0), or None (misc/teacher.py)."""
    if not getattr(opt, 'kd_weight', 0) > 0:
        return None
    from misc.teacher import load_teacher
    teacher = load_teacher(opt, vocab, device)
    print(f"distillation: teacher {opt.teacher_model} (K={teacher.K}), "
          f"kd_weight {opt.kd_weight}, teacher in {'eval' if opt.teacher_eval_mode else 'train'} mode", flush=True)
    return teacher


def build_optimizer(model, opt, iteration):
    """optim.build, with the state of --start_from's optimizer.pth when there is one."""
    optimizer = optim.build(model, opt)
    if isinstance(optimizer, optim.NoamOpt):
        optimizer._step = iteration  # as the reference; optimizer.pth, when present, overrides it
    path = os.path.join(opt.start_from or '', 'optimizer.pth')
    if opt.start_from and os.path.isfile(path):
        # reference quirk: the saved param_groups (betas, eps of a Noam stage 1 included) replace the new ones;
        # the lr is set again at the start of every epoch.
        state = load_torch(path, 'optimizer')
        if 'optimizer_state_dict' in state and not isinstance(optimizer, optim.PlateauOpt):
            state = state['optimizer_state_dict']  # a --reduce_on_plateau run resumed without it
        optimizer.load_state_dict(state)
    return optimizer


# ----------------------------------------------------------------------------------------------- loop pieces
def set_epoch_lr(optimizer, opt, epoch):
    """Plain optimisers get the step-decayed lr at each epoch start (Noam and plateau manage their own)."""
    if not opt.noamopt and not opt.reduce_on_plateau:
        optim.set_lr(optimizer, optim.step_decay_rate(epoch, opt))


def train_step(trainer, optimizer, batch, sc_flag, opt, stop=False, world_size=1):
    """One optimisation step; returns {'loss': float, 'reward': float (self-critical only), 'skipped': bool,
    'stop': bool}.

    trainer: the LossWrapper, or the DistributedDataParallel around it (which averages the gradients over ranks
    during backward, before the element-wise clamp).
    Non-finite guard (ours): the loss and the largest |gradient| (one fused reduction over every gradient, NaN
    propagating, before the clamp hides an inf) decide whether the update runs; 'skipped' when it did not.
    With DDP that flag and `stop` (a signal asked this rank to stop) are all-reduced (MAX), so that every rank
    skips and stops at the same iteration. One host synchronisation per step, as before (the loss value)."""
    optimizer.zero_grad()
    with torch.autocast(batch['att_feats'].device.type, dtype=torch.bfloat16, enabled=bool(opt.bf16)):
        out = trainer(batch, sc_flag)
    loss = out['loss']
    loss.backward()
    params = [p for p in trainer.parameters() if p.grad is not None]
    worst = loss.detach().float().abs().reshape(1)
    if params:
        norms = torch._foreach_norm([p.grad for p in params], math.inf)
        worst = torch.cat([worst, torch.stack([n.float() for n in norms])])
    flags = (~torch.isfinite(worst.max())).float().reshape(1)  # 1: non-finite somewhere
    if world_size > 1:
        flags = torch.cat([flags, torch.full((1,), float(stop), device=flags.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    values = torch.cat([loss.detach().float().reshape(1), flags]).tolist()
    skipped = values[1] > 0
    if not skipped:
        optim.clamp_gradients(params, opt.grad_clip)
        optimizer.step()
    result = {'loss': values[0], 'skipped': skipped, 'stop': values[2] > 0 if world_size > 1 else bool(stop)}
    if 'reward' in out:
        result['reward'] = float(out['reward'])
    return result


def validate(model, loader, crit, opt, device):
    """Greedy decoding of val_images_use val images; returns (val_loss, predictions, lang_stats, score).

    score (higher is better) selects model-best: CIDEr with --language_eval 1, else minus the val loss."""
    import dataclasses
    from misc.coco_eval import language_eval
    from opts import decode_config
    config = dataclasses.replace(decode_config(opt), sample_max=True)
    result = evaluate(model, loader, 'val', config, num_images=opt.val_images_use, batch_size=opt.batch_size,
                      remove_bad_endings=bool(opt.remove_bad_endings), crit=crit, bf16=opt.bf16)
    lang_stats = None
    if opt.language_eval:
        lang_stats, _ = language_eval(result.predictions, opt.ref_json, split_name='val')
    score = lang_stats['CIDEr'] if lang_stats else -result.loss
    return result.loss, result.predictions, lang_stats, score


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


def self_critical_ahead(opt, epoch):
    """Will this run reach an epoch >= --self_critical_after?"""
    return opt.self_critical_after != -1 and (opt.max_epochs == -1 or max(epoch, opt.self_critical_after) < opt.max_epochs)


# ----------------------------------------------------------------------------------------------- interrupts, RNG
class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM; `message` says what was saved. main() prints it on one line
    and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum=signal.SIGINT, message=''):
        super().__init__(message)
        self.signum, self.message = signum, message


class _Abort(Interrupted):
    """A second signal: stop at once, saving nothing more."""


class NonFiniteTraining(SaticError):
    """NONFINITE_STOP consecutive iterations had a non-finite loss or gradient."""


class _Signals:
    """SIGINT/SIGTERM while train() runs (main thread only). The first signal is honoured between iterations
    (phase 'train': training stops after the iteration in progress and saves its state) or after the save in
    progress (phase 'save'); in phase 'setup' (nothing to save yet) or 'validate' (which may take minutes) it raises
    Interrupted at once. A second signal raises _Abort wherever it lands: nothing more is saved (the save protocol
    keeps the last completed save intact)."""

    def __init__(self):
        self.signum, self.phase, self._previous = None, 'setup', {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise _Abort(signum)
        self.signum = signum
        if self.phase in ('setup', 'validate'):
            raise Interrupted(signum)


def rng_state(device):
    """This process's random-number generators (torch CPU, CUDA of `device`, numpy, random), picklable with
    protocol 2 and loadable by misc.checkpoint's restricted unpickler."""
    state = {'torch': torch.get_rng_state().numpy().tobytes(), 'numpy': np.random.get_state(),
             'random': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(torch.frombuffer(bytearray(state['torch']), dtype=torch.uint8))
    np.random.set_state(state['numpy'])
    random.setstate(state['random'])
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state['cuda']), dtype=torch.uint8), device)


def gather_rng_states(device, world_size):
    """[the RNG state of every rank] (a collective with world_size > 1: every rank calls it)."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    every = [None] * world_size
    dist.all_gather_object(every, mine)
    return every


# ----------------------------------------------------------------------------------------------- main
def train(opt):
    """Both stages of SPEC.md section 4; returns {'iter', 'epoch', 'best_val_score'} of the end of the run."""
    from dataloader import DataLoader
    rank, world_size, device = setup_distributed(opt)
    loader = writer = None
    signals = _Signals().install()
    try:
        torch.manual_seed(opt.seed + rank)
        random.seed(opt.seed + rank)
        np.random.seed(opt.seed + rank)
        if rank == 0:
            check_writable_dir(opt.checkpoint_path)  # now, not at the first save hours later
            if opt.start_from:
                recover_checkpoint(opt.start_from, opt.id)  # completes a save that a kill cut between its renames
        if world_size > 1 and opt.start_from:
            dist.barrier()
        loader = DataLoader(opt, rank=rank, world_size=world_size)
        check_data(opt, loader)
        opt.vocab_size, opt.seq_length = loader.vocab_size, loader.seq_length
        infos, histories = load_resume_state(opt, loader.get_vocab())
        if infos.get('iterators') is not None and infos.get('split_ix') is not None:
            loader.load_state_dict({'iterators': infos['iterators'], 'split_ix': infos['split_ix']})
        if opt.language_eval and rank == 0:
            from misc.coco_eval import check_ready
            check_ready(opt.ref_json)
        model = build_model(opt, device)
        if opt.start_from:  # (ours) model.pth must be the model its infos was saved with (when the infos says)
            check_infos_match(infos, model.state_dict(), vocab=loader.get_vocab(), opt=opt,
                              infos_path=os.path.join(opt.start_from, f'infos_{opt.id}.pkl'),
                              model_path=os.path.join(opt.start_from, 'model.pth'))
        loss_wrapper = LossWrapper(model, opt, teacher=build_teacher(opt, loader.get_vocab(), device))
        if self_critical_ahead(opt, infos.get('epoch', 0)):
            loss_wrapper.load_reward()  # a missing --cached_tokens fails now, not epochs into the run
        if rank == 0:
            os.makedirs(opt.checkpoint_path, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(opt.checkpoint_path)
        return train_loop(opt, loader, model, loss_wrapper, infos, histories, writer, rank, world_size, device,
                          signals)
    finally:
        if loader is not None:
            loader.close()
        if writer is not None:
            writer.close()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        signals.restore()


def train_loop(opt, loader, model, loss_wrapper, infos, histories, writer, rank, world_size, device, signals=None):
    """The iterations, validations and saves of one run. What a save records resumes exactly: the model, the
    optimiser, the loader position and order, the RNG states of every rank, all as after one completed iteration.

    Ends (ours): a signal stops after the iteration in progress, saves it and raises Interrupted; NONFINITE_STOP
    consecutive skipped (non-finite) iterations raise NonFiniteTraining after saving the state before them; any other
    error saves the last completed iteration (when newer than the last save) and is re-raised."""
    is_main = rank == 0
    signals = signals or _Signals()
    trainer = loss_wrapper
    if world_size > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(
            loss_wrapper, device_ids=[device.index] if device.type == 'cuda' else None)
    iteration, epoch = infos.get('iter', 0), infos.get('epoch', 0)
    steps = infos.get('optimizer_step')  # < iteration after skipped updates
    optimizer = build_optimizer(model, opt, iteration if steps is None else steps)
    if opt.start_from and os.path.isfile(os.path.join(opt.start_from, 'optimizer.pth')):
        check_infos_match(infos, optimizer_state=optimizer.state_dict(),
                          infos_path=os.path.join(opt.start_from, f'infos_{opt.id}.pkl'),
                          optimizer_path=os.path.join(opt.start_from, 'optimizer.pth'))
    best_val_score = infos.get('best_val_score') if opt.load_best_score else None
    histories = {key: histories.get(key, {}) for key in
                 ('val_result_history', 'loss_history', 'lr_history', 'ss_prob_history')}
    if opt.start_from:
        saved_rng = infos.get('rng_states')
        if saved_rng and len(saved_rng) == world_size and saved_rng[rank]:
            set_rng_state(saved_rng[rank], device)  # the generators as they were after the saved iteration
        elif is_main:
            print(f'note: {opt.start_from} holds no random-number state for {world_size} rank(s): the random draws '
                  f'(dropout, sampling) restart from --seed {opt.seed}', flush=True)
    if opt.start_from and is_main:
        print(f'resuming {opt.start_from} at iteration {iteration} (epoch {epoch}), '
              f'train position {loader.iterators["train"]}, best score {best_val_score}', flush=True)
        saved_seed = getattr(infos.get('opt'), 'seed', opt.seed)
        if saved_seed != opt.seed:  # the loader's caption draws and epoch orders are functions of the seed
            print(f'note: --seed {opt.seed} is not the checkpoint\'s {saved_seed}: the captions drawn per image and '
                  f'the order of the next epochs differ from those of an uninterrupted run', flush=True)

    iters_per_epoch = math.ceil(len(loader.split_ix['train']) / (opt.batch_size * world_size))
    total = opt.max_epochs * iters_per_epoch if opt.max_epochs > 0 else 0
    if opt.max_iters > 0:
        total = min(total, opt.max_iters) if total else opt.max_iters
    progress = ProgressLine(iteration, total)

    def resume_point():
        """What a checkpoint records about where training is: taken after each completed iteration only, so that
        an interrupt in the middle of one saves a state that resumes exactly (not one batch ahead)."""
        return {'iter': iteration, 'epoch': epoch, **loader.state_dict(), 'rng': rng_state(device)}

    def snapshot(point, rng_states, best=False):
        """Save `point` (rank 0); rng_states: every rank's generators, or None when they are not known."""
        infos_now = {**{k: v for k, v in point.items() if k != 'rng'}, 'vocab': loader.get_vocab(),
                     'opt': argparse.Namespace(**vars(opt)), 'best_val_score': best_val_score,
                     'rng_states': rng_states}
        history_iter = point['iter'] if opt.save_history_ckpt else None
        phase, signals.phase = signals.phase, 'save'
        save_checkpoint(opt.checkpoint_path, opt.id, model, optimizer, infos_now, histories, best, history_iter)
        signals.phase = phase

    def validate_and_save(rng_states):
        nonlocal best_val_score
        point = resume_point()  # before validation moves the val iterator
        signals.phase = 'validate'  # a signal now cuts the validation short (the except clause saves `point`)
        val_loss, predictions, lang_stats, score = validate(model, loader, loss_wrapper.crit, opt, device)
        signals.phase = 'save'
        rng_states[0] = rng_state(device)  # (validation draws nothing; should it, resuming continues after it)
        if opt.reduce_on_plateau:
            optimizer.scheduler_step(-lang_stats['CIDEr'] if lang_stats else val_loss)
        writer.add_scalar('validation loss', val_loss, iteration)
        for metric, value in (lang_stats or {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(metric, value, iteration)
        histories['val_result_history'][iteration] = {'loss': val_loss, 'lang_stats': lang_stats,
                                                      'predictions': predictions}
        best = best_val_score is None or score > best_val_score
        if best:
            best_val_score = score
        snapshot(point, rng_states, best)
        signals.phase = 'train'
        shown = f"CIDEr {lang_stats['CIDEr']:.4f}" if lang_stats else f'val loss {val_loss:.4f}'
        print(f"validation at iter {iteration}: {shown}{' (best so far)' if best else ''}; "
              f"checkpoint written to {opt.checkpoint_path}", flush=True)

    def validate_and_save_on_rank0():
        rng_states = gather_rng_states(device, world_size)  # every rank, as after this iteration
        if is_main:
            validate_and_save(rng_states)
        if world_size > 1:
            dist.barrier()  # the other ranks wait for rank 0's validation

    def save_on_rank0(point):
        rng_states = gather_rng_states(device, world_size)
        if is_main:
            snapshot(point, rng_states)
        if world_size > 1:
            dist.barrier()

    def saved_line(n):
        return f'the state after iteration {n} is saved in {opt.checkpoint_path}; resume with --start_from ' \
               f'{opt.checkpoint_path}'

    def kept_line():
        if last_saved == start_iteration:
            return 'nothing was saved by this run'
        return f'{opt.checkpoint_path} keeps its last completed save (iteration {last_saved})'

    epoch_done, last_saved, sc_flag, stop = True, iteration, False, False
    start_iteration = iteration
    point = good_point = resume_point()  # good_point: after the last iteration whose update ran
    streak = []  # the iterations of the current run of skipped (non-finite) updates
    signals.phase = 'train'
    try:
        while True:
            if epoch_done:
                set_epoch_lr(optimizer, opt, epoch)
                sc_flag = opt.self_critical_after != -1 and epoch >= opt.self_critical_after
                epoch_done = False
            if (opt.max_epochs != -1 and epoch >= opt.max_epochs) or (opt.max_iters > 0 and iteration >= opt.max_iters):
                break
            batch = to_device(loader.get_batch('train'), device)
            stats = train_step(trainer, optimizer, batch, sc_flag, opt, signals.signum is not None, world_size)
            iteration += 1
            if batch['bounds']['wrapped']:
                epoch += 1
                epoch_done = True
            point = resume_point()
            if stats['skipped']:
                streak.append(iteration)
                images = ', '.join(str(info['id']) for info in batch['infos'])
                if world_size > 1:
                    print(f"warning: rank {rank}: iteration {iteration}: non-finite loss or gradient on some rank "
                          f"(loss here {stats['loss']:.4g}); update skipped on every rank; images here {images}",
                          file=sys.stderr, flush=True)
                else:
                    print(f"warning: iteration {iteration}: non-finite loss or gradient (loss {stats['loss']:.4g}); "
                          f"update skipped; images {images}", file=sys.stderr, flush=True)
                if len(streak) >= NONFINITE_STOP:
                    raise NonFiniteTraining(
                        f'{len(streak)} consecutive iterations ({streak[0]}-{streak[-1]}) had a non-finite loss or '
                        f'gradient (images of the last: {images}): stopping; lower --learning_rate or check those '
                        f'features')
            else:
                streak, good_point = [], point
                if is_main and iteration % opt.losses_log_every == 0:
                    lr = optim.get_lr(optimizer)
                    progress(iteration, epoch, stats, lr)
                    writer.add_scalar('train_loss', stats['loss'], iteration)
                    writer.add_scalar('learning_rate', lr, iteration)
                    if sc_flag:
                        # (ours) the mean CIDEr-D of the samples; the reference logged the mean advantage, ~0 under nsc
                        writer.add_scalar('avg_reward', stats['reward'], iteration)
                    histories['loss_history'][iteration] = stats['reward'] if sc_flag else stats['loss']
                    histories['lr_history'][iteration] = lr
                    histories['ss_prob_history'][iteration] = 0.0
            if iteration % opt.save_checkpoint_every == 0:
                validate_and_save_on_rank0()
                last_saved = iteration
            stop = stats['stop'] if world_size > 1 else signals.signum is not None
            if stop:
                break
        if stop:  # a signal: the iteration in progress was completed; save it (if not just saved) and stop
            if iteration != last_saved:
                save_on_rank0(point)
                last_saved = iteration
            raise Interrupted(signals.signum or signal.SIGINT, saved_line(iteration) if is_main else
                              f'rank {rank} stopped after iteration {iteration}')
        if iteration != last_saved:  # (ours) the final weights are always validated and saved
            validate_and_save_on_rank0()
            last_saved = iteration
        if signals.signum is not None:  # a signal during the final validation's save: the run is complete
            raise Interrupted(signals.signum, f'the run had finished; the state after iteration {iteration} is saved '
                                              f'in {opt.checkpoint_path}')
    except BaseException as e:
        if isinstance(e, Interrupted) and e.message:
            raise
        if isinstance(e, _Abort):
            raise _Abort(e.signum, f'stopped at once by a second signal; {kept_line()}') from None
        todo = good_point if isinstance(e, NonFiniteTraining) else point
        saved = ''
        if is_main and not isinstance(e, CheckpointError) and todo['iter'] > last_saved:
            signals.phase = 'save'
            snapshot(todo, [todo['rng']] if world_size == 1 else None)
            saved = saved_line(todo['iter'])
        if isinstance(e, KeyboardInterrupt) or (world_size > 1 and signals.signum is not None
                                                and not isinstance(e, SaticError)):
            # (the second case: a rank waiting at a barrier whose peer stopped on the same Ctrl-C)
            raise Interrupted(getattr(e, 'signum', signals.signum or signal.SIGINT),
                              saved or kept_line()) from None
        if saved:
            print(f'{saved} (stopping on the error below)', file=sys.stderr, flush=True)
        raise
    return {'iter': iteration, 'epoch': epoch, 'best_val_score': best_val_score}


def main(argv=None):
    """train.py: 0 when the run completes; 2 with one 'error: ...' line for bad options or input (as eval.py);
    128 + the signal (130 Ctrl-C, 143 SIGTERM) with one 'interrupted ...' line saying what was saved."""
    try:
        opt = parse_opt(argv)
    except SystemExit as e:  # check_opt's one line (argparse's own errors have printed theirs and exit 2)
        if isinstance(e.code, str):
            print(e.code if e.code.startswith('error: ') else f'error: {e.code}', file=sys.stderr)
            return 2
        return e.code or 0
    try:
        train(opt)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f'interrupted by {signal.Signals(e.signum).name}: {e.message or "nothing saved"}', file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print('interrupted by SIGINT: nothing saved', file=sys.stderr)
        return 130
    return 0

if __name__ == '__main__':
    sys.exit(main())
