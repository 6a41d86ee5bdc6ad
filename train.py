"""Train a SATIC captioner: XE (or sequence-level KD labels) with Noam, then self-critical CIDEr-D (README, "Using
it on COCO").

Stage 1:  python train.py --noamopt --noamopt_warmup 20000 ... --input_label_h5 data/cocotalk_seq-kd-..._label.h5
              --checkpoint_path save/sat-2-from-nsc-seqkd --id sat-2-from-nsc-seqkd --K 2
Stage 2:  (cd save && ./copy_model.sh sat-2-from-nsc-seqkd nsc-sat-2-from-nsc-seqkd), then
          python train.py ... --self_critical_after 10 --start_from save/nsc-sat-2-from-nsc-seqkd ... --K 2

Several GPUs or nodes: torchrun --nproc_per_node N train.py ... (docs/speed.md, "Several GPUs"): each rank trains on its
shard of the training split (--batch_size images per rank), DistributedDataParallel averages the gradients, every
rank decodes its share of the validation images; rank 0 computes the COCO metrics, logs and writes checkpoints.

Top to bottom: building a run (`build_run`: data, model, loss, optimiser, and what --start_from restores), one
optimisation step (`train_step`), one validation (`validate`), then the loop (`train_loop`) over a `TrainState`.
misc/run/checkpoint.py owns the run on disk (load_run, CheckpointSaver), misc/run/interrupts.py the signals.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

import models
from dataloader import DataConfig, DataLoader
from misc.train import optim
from misc.run.checkpoint import (CheckpointError, CheckpointSaver, ResumePoint, check_writable_dir, histories_of,
                             load_init_from, load_run, recover_checkpoint, rng_state)
from misc.eval.coco_eval import check_ready, language_eval
from misc.options.configs import ModelConfig, OptimConfig, StepConfig  # (StepConfig: train.StepConfig too)
from misc.run.distributed import World, all_gather_objects, run_everywhere, run_on_main, setup_distributed, shutdown
from misc.errors import SaticError
from misc.eval.evaluation import evaluate
from misc.run.interrupts import Aborted, Interrupted, Signals
from misc.train.loss_wrapper import LossConfig, LossWrapper
from misc.run.runfolder import RunFolderLock, check_not_busy, check_owner, same_folder
from misc.train.step import precision as set_precision, train_step  # noqa: F401 (step_numbers: misc.train.step)
from misc.train.teacher import load_teacher
from misc.utils import format_duration, to_device
from models.accel.speed import compile_model, use_cuda_graphs
from models.loading import load_model, restore_model
from opts import decode_config, parse_opt

# (ours) Consecutive iterations with a non-finite loss or gradient (each skipped) after which training stops.
NONFINITE_STOP = 5


class NonFiniteTraining(SaticError):
    """NONFINITE_STOP consecutive iterations had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------------------------- building a run
def check_data(opt, loader):
    """Training needs captions, and the model's input size must be the features' (not a shape error later)."""
    if loader.labels is None:
        raise SaticError("training needs captions: --input_label_h5 none is for evaluating caption-less images")
    if not loader.split_ix['val']:
        raise SaticError(f"{opt.input_json} has no val images: training validates on them at every checkpoint")
    loader.check_att_feat_size(opt.att_feat_size, '--att_feat_size')


def run_options(opt, loader):
    """The options the run builds from and records in infos: the command line's plus the data's vocab_size and
    seq_length (a copy: the parsed options stay as parsed)."""
    return argparse.Namespace(**{**vars(opt), 'vocab_size': loader.vocab_size, 'seq_length': loader.seq_length})


def build_model(opt, device, saved=None, vocab=None):
    """The model, its weights from --start_from (saved: a misc.run.checkpoint.SavedRun), or (SAT, K > 1) from the
    autoregressive --init_from (checked against the infos beside it, when there is one, and this data's vocab)."""
    model = models.setup(ModelConfig.from_opt(opt), opt.vocab_size)
    if saved is not None:
        restore_model(saved, model)
    elif opt.K > 1 and opt.init_from and opt.init_from.lower() != 'none':
        if not os.path.isfile(opt.init_from):
            raise SaticError(f"--init_from {opt.init_from}: not found. SAT (K > 1) starts from an autoregressive "
                             f"checkpoint: train the transformer baseline first (README), or pass --init_from none")
        state = load_init_from(opt.init_from, vocab)
        models.load_weights(model, state, opt.init_from)
        print(f'initialised from the autoregressive checkpoint {opt.init_from}')
    model = model.to(device)
    use_cuda_graphs(model, opt.cuda_graphs)  # validation's decoding (ours, off by default; a GPU only)
    if opt.compile:  # (ours) opt-in: compiled on the first iterations (docs/speed.md, "Speed options")
        compile_model(model)
    return model


def build_teacher(opt, vocab, device):
    """The frozen --teacher_model of word-level distillation (--kd_weight > 0), or None (misc/train/teacher.py)."""
    if not opt.kd_weight > 0:
        return None
    teacher = load_teacher(opt.teacher_model, vocab, opt.att_feat_size, opt.teacher_infos, opt.teacher_caption_model,
                           bool(opt.teacher_eval_mode), opt.input_json, device, load_model=load_model)
    print(f"distillation: teacher {opt.teacher_model} (K={teacher.K}), "
          f"kd_weight {opt.kd_weight}, teacher in {'eval' if opt.teacher_eval_mode else 'train'} mode", flush=True)
    return teacher


def build_optimizer(model, opt, saved=None):
    """optim.build, with the state of --start_from's optimizer.pth when there is one (Noam's step otherwise
    continues from the saved run's updates, as the reference)."""
    optimizer = optim.build(model, OptimConfig.from_opt(opt), opt.input_encoding_size,
                            step=saved.optimizer_step if saved else 0)
    if saved is not None:
        saved.restore_optimizer(optimizer)
    return optimizer


def data_parallel(loss_wrapper, opt, world):
    """The module a training step calls: the LossWrapper, or with several ranks the DistributedDataParallel around
    it (which averages the gradients over ranks during backward). Buffers are broadcast from rank 0 at the start,
    then before each forward only with BatchNorm (--use_bn: its running statistics); the model's other buffer, the
    positional encodings, never changes (forward_sync_buffers is torch 2.13's name for broadcast_buffers)."""
    if not world.distributed:
        return loss_wrapper
    device = world.device
    return torch.nn.parallel.DistributedDataParallel(
        loss_wrapper, device_ids=[device.index] if device.type == 'cuda' else None,
        forward_sync_buffers=bool(opt.use_bn))


def precision(opt, world):
    """--tf32 and --fp16 of the parsed options (misc.train.step.precision): the torch.amp.GradScaler or None."""
    return set_precision(bool(opt.tf32), bool(opt.fp16), world.device)


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def self_critical_ahead(opt, epoch):
    """Will this run reach an epoch >= --self_critical_after?"""
    return opt.self_critical_after != -1 and (opt.max_epochs == -1 or max(epoch, opt.self_critical_after) < opt.max_epochs)


def iterations_per_epoch(opt, loader, world):
    """An epoch is one pass of the global batch (--batch_size images on each of the world.size ranks)."""
    return math.ceil(len(loader.split_ix['train']) / (opt.batch_size * world.size))


def global_batch_line(opt, loader, world):
    return (f'global batch: {opt.batch_size} images x {world.size} rank(s) x {opt.seq_per_img} captions = '
            f'{opt.batch_size * world.size * opt.seq_per_img} captions per iteration, '
            f'{iterations_per_epoch(opt, loader, world)} iterations per epoch')


def total_iterations(opt, loader, world):
    """Iterations of the whole run (0: unknown), for the ETA."""
    total = opt.max_epochs * iterations_per_epoch(opt, loader, world) if opt.max_epochs > 0 else 0
    if opt.max_iters > 0:
        total = min(total, opt.max_iters) if total else opt.max_iters
    return total


class ProgressLine:
    """A periodic line: iteration, epoch, loss or reward, lr, it/s, ETA. it/s counts training time only (the time
    of validations and saves is excluded); the ETA adds the validations still due at their mean duration."""

    def __init__(self, start_iter, total_iters, validate_every=0):
        self.start_iter, self.total_iters, self.validate_every = start_iter, total_iters, validate_every
        self.t0 = time.time()
        self.excluded, self.validations = 0.0, 0  # seconds spent validating and saving, and how many times

    def exclude(self, seconds):
        """Leave out of the rate seconds spent outside training steps (one validation and save)."""
        self.excluded += seconds
        self.validations += 1

    def __call__(self, iteration, epoch, stats, lr):
        rate = (iteration - self.start_iter) / max(time.time() - self.t0 - self.excluded, 1e-9)
        eta = '?'
        if self.total_iters and rate > 0:
            left = (self.total_iters - iteration) / rate
            if self.validations and self.validate_every > 0:
                due = self.total_iters // self.validate_every - iteration // self.validate_every
                left += max(due, 0) * self.excluded / self.validations
            eta = format_duration(left)
        what = f"reward {stats['reward']:.4f} loss {stats['loss']:.4f}" if 'reward' in stats else f"loss {stats['loss']:.4f}"
        print(f'iter {iteration} (epoch {epoch}) {what} lr {lr:.3g} {rate:.2f} it/s ETA {eta}', flush=True)


@dataclasses.dataclass
class Run:
    """What one training run is made of (build_run). What changes from iteration to iteration is a TrainState."""
    opt: argparse.Namespace  # run_options: the command line's plus vocab_size and seq_length
    world: World
    loader: object  # dataloader.DataLoader
    model: torch.nn.Module
    loss_wrapper: LossWrapper
    loss_module: torch.nn.Module  # what a step calls: loss_wrapper, or the DistributedDataParallel around it
    optimizer: object
    signals: Signals
    step_config: 'StepConfig'  # what train_step reads of the options
    scaler: object = None  # --fp16: torch.amp.GradScaler
    saver: CheckpointSaver = None  # rank 0 only, as the writer and the progress line
    writer: object = None
    progress: ProgressLine = None


@dataclasses.dataclass
class TrainState:
    """Where training is. A save records `point` (or `good_point`), best_val_score and histories."""
    point: ResumePoint  # after the last completed iteration
    good_point: ResumePoint  # after the last iteration whose update ran
    best_val_score: float = None
    best_iteration: int = None  # the iteration of best_val_score (None: unknown, from a run resumed)
    histories: dict = dataclasses.field(default_factory=histories_of)
    last_saved: int = 0  # the iteration of the last completed save (at first: the one resumed)
    start_iteration: int = 0
    skipped: list = dataclasses.field(default_factory=list)  # the current run of skipped (non-finite) iterations
    sc_flag: bool = False  # self-critical this epoch
    new_epoch: bool = True  # an epoch starts: set its lr and sc_flag
    stop: bool = False  # a signal asked to stop (on some rank)
    saving: tuple = None  # (iteration, best) while rank 0 saves it: what a second signal abandons
    # (ours) the validation of this iteration is due and not yet saved: a save made now (a signal or an error cut
    # the validation short) records it as pending, and the run that resumes from it validates first
    validation_due: bool = False

    @property
    def iteration(self):
        return self.point.iteration

    @property
    def epoch(self):
        return self.point.epoch


def start_state(run, saved):
    """The TrainState at the start of the run: iteration 0, or where --start_from's run stopped (its generators
    restored, with a note where they cannot be)."""
    opt, world = run.opt, run.world
    iteration, epoch = (saved.iteration, saved.epoch) if saved else (0, 0)
    best_val_score = saved.infos.get('best_val_score') if saved and opt.load_best_score else None
    if saved and run.scaler is not None:
        saved.restore_scaler(run.scaler)
    if saved and not saved.restore_rng(world.rank, world.size, world.device) and world.is_main:
        print(f'note: {opt.start_from} holds no random-number state for {world.size} rank(s): the random draws '
              f'(dropout, sampling) restart from --seed {opt.seed}', flush=True)
    if saved and world.is_main:
        print(f'resuming {opt.start_from} at iteration {iteration} (epoch {epoch}), train position '
              f'{run.loader.iterators["train"]}, best score {score_text(best_val_score, opt.language_eval)}',
              flush=True)
        saved_seed = opt.seed if saved.seed is None else saved.seed
        if saved_seed != opt.seed:  # the loader's caption draws and epoch orders are functions of the seed
            print(f'note: --seed {opt.seed} is not the checkpoint\'s {saved_seed}: the captions drawn per image and '
                  f'the order of the next epochs differ from those of an uninterrupted run', flush=True)
    point = ResumePoint(iteration, epoch, run.loader.state_dict(), rng_state(world.device))
    pending = bool(saved) and saved.validation_pending
    if pending and world.is_main:
        print(f'the validation of iteration {iteration} was interrupted: redoing it', flush=True)
    histories = histories_of(saved.histories if saved else None)
    return TrainState(point, point, best_val_score, best_of(histories, best_val_score), histories,
                      last_saved=iteration, start_iteration=iteration, validation_due=pending)


def best_of(histories, best_val_score):
    """The iteration whose validation scored best_val_score in val_result_history (CIDEr, or minus the val loss),
    None when none did."""
    if best_val_score is None:
        return None
    for iteration, result in sorted(histories['val_result_history'].items()):
        lang_stats = result.get('lang_stats') or {}
        score = lang_stats['CIDEr'] if 'CIDEr' in lang_stats else \
            (-result['loss'] if result.get('loss') is not None else None)
        if score == best_val_score:
            return iteration
    return None


def score_text(score, language_eval=True):
    """best_val_score for people: 'CIDEr 0.1741' (language_eval), else 'val loss 2.3456' (the score is minus it);
    'none yet' before any validation."""
    if score is None:
        return 'none yet'
    return f'CIDEr {score:.4f}' if language_eval else f'val loss {-score:.4f}'


def prepare_folders(opt, cleanup):
    """Rank 0, before any work: --checkpoint_path must be writable (now, not at the first save hours later) and
    this run's alone (misc/run/runfolder.py: its lock, held until cleanup closes, and the rule on the checkpoint it
    holds); a --start_from folder must not be a live run's; a save of --start_from that a kill cut between its
    renames is completed. Returns whether the first save replaces the folder's checkpoint (--overwrite_run 1)."""
    check_writable_dir(opt.checkpoint_path)
    cleanup.enter_context(RunFolderLock(opt.checkpoint_path))
    replaced = check_owner(opt.checkpoint_path, opt.id, opt.start_from, opt.overwrite_run)
    if opt.start_from:
        if not same_folder(opt.start_from, opt.checkpoint_path):
            check_not_busy(opt.start_from)
        recover_checkpoint(opt.start_from, opt.id)
    return bool(replaced)


def build_run(opt, world, signals, cleanup):
    """Data, model, loss, optimiser and checkpoint writer of a run, with what --start_from restores (README,
    "Interrupts and resume") -> (Run, TrainState). cleanup: the contextlib.ExitStack that closes them."""
    seed_everything(opt.seed + world.rank)
    # (the other ranks read the folders afterwards and take no lock: one owner per folder)
    replace = run_on_main(lambda: prepare_folders(opt, cleanup), world, 'the set-up')
    loader = cleanup.enter_context(DataLoader(DataConfig.from_opt(opt), rank=world.rank, world_size=world.size,
                                             pin_memory=world.device.type == 'cuda'))
    check_data(opt, loader)
    note = loader.caption_sampling_note()
    if note and world.is_main:
        print(note, flush=True)
    run_opt, vocab = run_options(opt, loader), loader.get_vocab()
    saved = load_run(opt.start_from, opt.id, ModelConfig.from_opt(run_opt), vocab, opt.input_json) \
        if opt.start_from else None
    if saved is not None and saved.loader_state is not None:
        loader.load_state_dict(saved.loader_state)
    if opt.language_eval:
        # Java, the references and (--spice 1) SPICE: rank 0's job
        run_on_main(lambda: check_ready(opt.ref_json, opt.spice), world, 'the set-up')
        if opt.spice == 'auto' and world.is_main:  # said once per run, not at every validation
            print('SPICE: not computed at validation (--spice auto; --spice 1 computes it there, eval.py computes it '
                  'where its jars work)', flush=True)
    model = build_model(run_opt, world.device, saved, vocab)
    teacher = build_teacher(run_opt, vocab, world.device)
    loss_wrapper = LossWrapper(model, LossConfig.from_opt(run_opt), teacher=teacher)
    if self_critical_ahead(opt, saved.epoch if saved else 0):
        loss_wrapper.load_reward()  # a missing --cached_tokens fails now, not epochs into the run
    run = Run(run_opt, world, loader, model, loss_wrapper, data_parallel(loss_wrapper, run_opt, world), None,
              signals, StepConfig.from_opt(run_opt), precision(run_opt, world))
    run.optimizer = build_optimizer(model, run_opt, saved)
    if world.is_main:
        from torch.utils.tensorboard import SummaryWriter  # (heavy, rank 0 only: not paid by --help or other ranks)
        os.makedirs(opt.checkpoint_path, exist_ok=True)
        run.writer = SummaryWriter(opt.checkpoint_path)
        cleanup.callback(run.writer.close)
        run.saver = CheckpointSaver(opt.checkpoint_path, opt.id, model, run.optimizer, vocab,
                                    recorded_options=vars(run_opt), config=ModelConfig.from_opt(run_opt),
                                    save_history_ckpt=bool(opt.save_history_ckpt),
                                    scaler=run.scaler, replace=replace)
        print(global_batch_line(opt, loader, world), flush=True)
    state = start_state(run, saved)
    run.progress = ProgressLine(state.iteration, total_iterations(opt, loader, world), opt.save_checkpoint_every)
    return run, state


# ----------------------------------------------------------------------------------------------- one step
def set_epoch_lr(optimizer, opt, epoch):
    """Plain optimisers get the step-decayed lr at each epoch start (Noam and plateau manage their own)."""
    if not opt.noamopt and not opt.reduce_on_plateau:
        optim.set_lr(optimizer, optim.step_decay_rate(epoch, OptimConfig.from_opt(opt)))


# ----------------------------------------------------------------------------------------------- one validation
def validate(model, loader, crit, opt, world=World()):
    """Greedy decoding of val_images_use val images -> {'loss', 'predictions', 'lang_stats', 'score'}, the same on
    every rank.

    Each rank reads and decodes every world.size-th batch of --val_batch_size images (and scores its loss); rank 0
    merges the shards in split order, computes the COCO metrics (--language_eval 1) and broadcasts the result: the
    numbers of one process. A failure on any rank raises on every rank (misc.run.distributed). score (higher is better) selects model-best: CIDEr with
    --language_eval 1, else minus the val loss."""
    config = dataclasses.replace(decode_config(opt), sample_max=True)
    shard = run_everywhere(lambda: evaluate(
        model, loader, 'val', config, num_images=opt.val_images_use, batch_size=opt.val_batch_size or opt.batch_size,
        remove_bad_endings=bool(opt.remove_bad_endings), crit=crit, bf16=opt.bf16, fp16=opt.fp16,
        shard=(world.rank, world.size), progress='validation'), world, 'validation')
    shards = all_gather_objects((shard.predictions, shard.positions, shard.loss, shard.loss_parts), world)
    return run_on_main(lambda: score_validation(shards, opt), world, 'validation')


def score_validation(shards, opt):
    """The validation result of the shards of every rank (rank 0): see validate."""
    predictions, loss = merge_shards(shards)
    lang_stats = None
    if opt.language_eval:
        # as the reference, every validation also writes eval_results/<id>_val.json (the latest one's scores)
        lang_stats, _ = language_eval(predictions, opt.ref_json, split_name='val', spice=spice_at_validation(opt),
                                      out_path=os.path.join('eval_results', f'{opt.id}_val.json'))
    return {'loss': loss, 'predictions': predictions, 'lang_stats': lang_stats,
            'score': lang_stats['CIDEr'] if lang_stats else -loss}


def spice_at_validation(opt):
    """--spice at validation: only with --spice 1 (SPICE takes 8 GB and minutes; eval.py computes it with auto)."""
    return '1' if opt.spice == '1' else '0'


def merge_shards(shards):
    """[(predictions, positions, loss, loss_parts)] of every rank -> (predictions in split order, val loss): the
    mean of the per-batch losses in batch order, the numbers of one process (each batch is one rank's)."""
    entries = sorted((position, prediction) for predictions, positions, _, _ in shards
                     for position, prediction in zip(positions, predictions))
    losses = [value for _, value in sorted(part for _, _, _, parts in shards for part in parts)]
    return [prediction for _, prediction in entries], sum(losses) / len(losses) if losses else None


# ----------------------------------------------------------------------------------------------- the loop
def train_loop(run, state):
    """The iterations, validations and saves of one run. What a save records resumes exactly: the model, the
    optimiser, the loader position and order, the RNG states of every rank, all as after one completed iteration.

    Ends (ours): a signal stops after the iteration in progress, saves it and raises Interrupted; NONFINITE_STOP
    consecutive skipped (non-finite) iterations raise NonFiniteTraining after saving the state before them; any other
    error saves the last completed iteration (when newer than the last save) and is re-raised."""
    opt, world, signals = run.opt, run.world, run.signals
    signals.phase = 'train'
    try:
        if state.validation_due:  # resumed from a save whose validation was cut short: as if it had not been
            validate_and_save(run, state)
        while not state.stop:
            if state.new_epoch:
                start_epoch(run, state)
            if (opt.max_epochs != -1 and state.epoch >= opt.max_epochs) or \
                    (opt.max_iters > 0 and state.iteration >= opt.max_iters):
                break
            batch = to_device(run.loader.get_batch('train'), world.device)
            stats = train_step(run.loss_module, run.optimizer, batch, state.sc_flag, run.step_config,
                               signals.requested, world.size, run.scaler)
            record_step(run, state, batch, stats)
            if state.iteration % opt.save_checkpoint_every == 0:
                validate_and_save(run, state)
            state.stop = stats['stop'] if world.distributed else signals.requested
        finish(run, state)
    except BaseException as error:
        stop_on(error, run, state)
    return {'iter': state.iteration, 'epoch': state.epoch, 'best_val_score': state.best_val_score}


def start_epoch(run, state):
    set_epoch_lr(run.optimizer, run.opt, state.epoch)
    state.sc_flag = run.opt.self_critical_after != -1 and state.epoch >= run.opt.self_critical_after
    state.new_epoch = False


def record_step(run, state, batch, stats):
    """After a step: the new resume point, then the non-finite guard's count or the logs."""
    wrapped = batch['bounds']['wrapped']
    state.point = ResumePoint(state.iteration + 1, state.epoch + int(wrapped), run.loader.state_dict(),
                              rng_state(run.world.device))
    state.new_epoch = wrapped
    if stats['skipped']:
        note_skipped(run, state, batch, stats)
        return
    state.skipped, state.good_point = [], state.point
    if run.world.is_main and state.iteration % run.opt.losses_log_every == 0:
        log_step(run, state, stats)


def note_skipped(run, state, batch, stats):
    """A skipped (non-finite) update: a warning naming the batch's images; NONFINITE_STOP in a row stop the run.
    An --fp16 gradient overflow while the loss scale is >= 1 is GradScaler's business: the scale halves and the
    next steps retry; it does not count (with a scale < 1 the gradient itself is not finite: it counts)."""
    where = ' on every rank' if run.world.distributed else ''
    if stats.get('overflow', 0) >= 1:
        print(f"warning: iteration {state.iteration}: fp16 gradient overflow at loss scale {stats['overflow']:g}; "
              f"update skipped{where}, the scale halves", file=sys.stderr, flush=True)
        return
    state.skipped.append(state.iteration)
    images = ', '.join(str(info['id']) for info in batch['infos'])
    if run.world.distributed:
        print(f"warning: rank {run.world.rank}: iteration {state.iteration}: non-finite loss or gradient on some rank "
              f"(loss here {stats['rank_loss']:.4g}); update skipped on every rank; images here {images}",
              file=sys.stderr, flush=True)
    else:
        print(f"warning: iteration {state.iteration}: non-finite loss or gradient (loss {stats['rank_loss']:.4g}); "
              f"update skipped; images {images}", file=sys.stderr, flush=True)
    if len(state.skipped) >= NONFINITE_STOP:
        raise NonFiniteTraining(
            f'{len(state.skipped)} consecutive iterations ({state.skipped[0]}-{state.skipped[-1]}) had a non-finite '
            f'loss or gradient (images of the last: {images}): stopping; lower --learning_rate or check those '
            f'features')


def log_step(run, state, stats):
    """The progress line, TensorBoard scalars and histories of an iteration (rank 0, every --losses_log_every)."""
    iteration, writer, histories = state.iteration, run.writer, state.histories
    lr = optim.get_lr(run.optimizer)
    run.progress(iteration, state.epoch, stats, lr)
    writer.add_scalar('train_loss', stats['loss'], iteration)
    writer.add_scalar('learning_rate', lr, iteration)
    if state.sc_flag:
        # (ours) the mean CIDEr-D of the samples; the reference logged the mean advantage, ~0 under nsc
        writer.add_scalar('avg_reward', stats['reward'], iteration)
    histories['loss_history'][iteration] = stats['reward'] if state.sc_flag else stats['loss']
    histories['lr_history'][iteration] = lr
    histories['ss_prob_history'][iteration] = 0.0


def gather_rng_states(world):
    """[the generators of every rank] as they are now (a collective with several ranks)."""
    return all_gather_objects(rng_state(world.device), world)


def validate_and_save(run, state):
    """Every --save_checkpoint_every iterations and at the end: every rank validates its share, rank 0 saves. The
    --reduce_on_plateau schedule steps on every rank, from the same broadcast score."""
    opt, world = run.opt, run.world
    started = time.time()
    rng_states = gather_rng_states(world)  # every rank, as after this iteration
    state.validation_due = True
    with run.signals.during('validate'):  # a signal now cuts the validation short (stop_on saves state.point)
        result = validate(run.model, run.loader, run.loss_wrapper.crit, opt, world)
    with run.signals.during('save'):
        if world.is_main:
            rng_states[0] = rng_state(world.device)  # (validation draws nothing; if it did, resuming continues after)
        if opt.reduce_on_plateau:
            run.optimizer.scheduler_step(-result['lang_stats']['CIDEr'] if result['lang_stats'] else result['loss'])
        best = state.best_val_score is None or result['score'] > state.best_val_score
        if best:
            state.best_val_score, state.best_iteration = result['score'], state.iteration
        run_on_main(lambda: record_and_save(run, state, result, rng_states, best), world, 'the checkpoint save')
    state.last_saved = state.iteration
    state.validation_due = False
    if world.is_main:
        lang_stats = result['lang_stats']
        shown = f"CIDEr {lang_stats['CIDEr']:.4f}" if lang_stats else f"val loss {result['loss']:.4f}"
        print(f"validation at iter {state.iteration}: {shown}{' (best so far)' if best else ''}; "
              f"checkpoint written to {opt.checkpoint_path}", flush=True)
    run.progress.exclude(time.time() - started)  # it/s counts training steps only


def record_and_save(run, state, result, rng_states, best):
    """Rank 0: the validation's TensorBoard scalars and history entry, then the checkpoint."""
    iteration, writer = state.iteration, run.writer
    writer.add_scalar('validation loss', result['loss'], iteration)
    for metric, value in (result['lang_stats'] or {}).items():
        if isinstance(value, (int, float)):
            writer.add_scalar(metric, value, iteration)
    state.histories['val_result_history'][iteration] = {
        'loss': result['loss'], 'lang_stats': result['lang_stats'], 'predictions': result['predictions']}
    save(run, state, state.point, rng_states, best)


def save(run, state, point, rng_states, best=False, validation_pending=False):
    """Rank 0: the checkpoint of `point`; state.saving says which while it is written (a second signal may
    abandon it: stop_on). validation_pending: the infos say that the validation of point is still to be done."""
    state.saving = (point.iteration, best)
    run.saver.save(point, state.best_val_score, state.histories, rng_states, best,
                   validation_pending=validation_pending)
    state.saving = None


def save_point(run, state, point, rng_states):
    """Save `point` without validating (rank 0); when its validation was due (cut short by a signal or an error),
    the infos record it as pending, and a resume redoes it first (so that model-best is the uninterrupted run's)."""
    with run.signals.during('save'):
        save(run, state, point, rng_states, validation_pending=state.validation_due and point is state.point)


def finish(run, state):
    """After the loop: a signal saves the iteration it let finish and raises Interrupted; a completed run is
    validated and saved once more (ours: the final weights always are)."""
    opt, world, signals = run.opt, run.world, run.signals
    if state.stop:
        if state.iteration != state.last_saved:
            rng_states = gather_rng_states(world)
            run_on_main(lambda: save_point(run, state, state.point, rng_states), world, 'the checkpoint save')
            state.last_saved = state.iteration
        raise Interrupted(signals.signum or signal.SIGINT, saved_line(opt, state.iteration) if world.is_main else
                          f'rank {world.rank} stopped after iteration {state.iteration}')
    if state.iteration != state.last_saved:
        validate_and_save(run, state)
    if signals.requested:  # a signal during the final validation's save: the run is complete
        raise Interrupted(signals.signum, f'the run had finished; the state after iteration {state.iteration} is '
                                          f'saved in {opt.checkpoint_path}')
    if world.is_main:
        print(summary_line(opt, state), flush=True)


def summary_line(opt, state):
    """The one line that ends a completed run: where it stopped, the best score (rounded), its iteration and
    where the model is."""
    best = score_text(state.best_val_score, opt.language_eval)
    line = f'done: {state.iteration} iterations (epoch {state.epoch}); best {best}'
    if state.best_iteration is not None:
        line += f' at iteration {state.best_iteration}'
    if state.best_val_score is None:
        return f'{line}; last model in {os.path.join(opt.checkpoint_path, "model.pth")}'
    return (f'{line}; best model {os.path.join(opt.checkpoint_path, "model-best.pth")} '
            f'(infos {os.path.join(opt.checkpoint_path, f"infos_{opt.id}-best.pkl")})')


def stop_on(error, run, state):
    """Raise what main() reports for an error that ended the loop, after saving the last completed iteration when it
    is newer than the last save (for NonFiniteTraining: the iteration before the skipped ones)."""
    opt, world, signals = run.opt, run.world, run.signals
    if isinstance(error, Interrupted) and error.message:
        raise error
    if isinstance(error, Aborted):
        raise Aborted(error.signum, aborted_line(run, state)) from None
    point = state.good_point if isinstance(error, NonFiniteTraining) else state.point
    saved = ''
    if world.is_main and not isinstance(error, CheckpointError) and point.iteration > state.last_saved:
        try:
            save_point(run, state, point, [point.rng] if not world.distributed else None)
        except Aborted as second:  # (a second signal during this save)
            raise Aborted(second.signum, aborted_line(run, state)) from None
        saved = saved_line(opt, point.iteration)
    if isinstance(error, KeyboardInterrupt) or (world.distributed and signals.requested
                                                and not isinstance(error, SaticError)):
        # (the second case: a rank waiting at a barrier whose peer stopped on the same Ctrl-C)
        raise Interrupted(getattr(error, 'signum', signals.signum or signal.SIGINT), saved or kept_line(opt, state)) \
            from None
    if saved:
        print(f'{saved} (stopping on the error below)', file=sys.stderr, flush=True)
    raise error


def saved_line(opt, iteration):
    return f'the state after iteration {iteration} is saved in {opt.checkpoint_path}; resume with --start_from ' \
           f'{opt.checkpoint_path}'


def aborted_line(run, state):
    """What a second signal leaves (rank 0 reads the folder: a save it cut after its commit is completed first):
    the save it abandoned, if any, and the iteration the folder holds."""
    opt, line = run.opt, 'stopped at once by a second signal'
    if not run.world.is_main:  # (rank 0 tells about the folder)
        return f'{line}; {kept_line(opt, state)}'
    try:
        manifest = recover_checkpoint(opt.checkpoint_path, opt.id)
    except SaticError:
        manifest = None
    held = manifest.get('iter') if manifest else None
    if state.saving and state.saving[0] != held:
        iteration, best = state.saving
        line += f"; the save of iteration {iteration}{' (a new best model)' if best else ''} was abandoned"
    if held is None:
        return f'{line}; nothing was saved by this run'
    return (f'{line}; {opt.checkpoint_path} holds its last completed save (iteration {held}); resume with '
            f'--start_from {opt.checkpoint_path}')


def kept_line(opt, state):
    if state.last_saved == state.start_iteration:
        return 'nothing was saved by this run'
    return f'{opt.checkpoint_path} keeps its last completed save (iteration {state.last_saved})'


# ----------------------------------------------------------------------------------------------- main
def train(opt):
    """Both stages (README, "The COCO recipe"); returns {'iter', 'epoch', 'best_val_score'} of the end of the run."""
    world = setup_distributed(opt.device, opt.dist_timeout_minutes)
    with contextlib.ExitStack() as cleanup:
        signals = Signals().install()
        cleanup.callback(signals.restore)
        run, state = build_run(opt, world, signals, cleanup)
        return train_loop(run, state)


def main(argv=None):
    """train.py: 0 when the run completes; 2 with one 'error: ...' line for bad options or input (as eval.py);
    128 + the signal (130 Ctrl-C, 143 SIGTERM) with one 'interrupted ...' line saying what was saved."""
    try:
        opt = parse_opt(argv)
    except SaticError as e:  # a refused option value (opts.check_opt...): one line
        print(f'error: {e}', file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's own errors have printed theirs (exit 2); --help (0)
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
    finally:  # here a handled error's frames, which hold the DistributedDataParallel wrapper, are gone
        shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
