"""The only reader and writer of checkpoints: everything a run folder holds goes through this module, with
misc.files' atomic writes (one commit point per save) and safe loads.

  reading:  misc.run.infos.read_infos (the infos schema and its one reader), load_model_state, load_init_from
            (train.py --init_from, checked against the infos beside it: default_infos_path), load_run -> SavedRun
            (--start_from: infos, histories, then model, optimizer, scaler and generators restored);
            models/loading.py builds models from these files (load_model, load_for_eval, restore_model);
  writing:  misc.run.infos.make_infos (FIELDS: the one place infos fields are named) + save_checkpoint /
            CheckpointSaver (a training run); write_checkpoint_files (plain model.pth + infos files: tests' fixtures).
Nothing else in the product calls misc.files.load_pickle/load_torch/save_* on checkpoint files (tests/test_checkpoint.py
greps for it): a new infos field is a row of misc.run.infos.FIELDS.
Infos are compared on their ModelConfig (misc.run.infos.model_config: a reference infos' opt converted once, at load
time); the run's and eval's own options are resolved in the entry scripts (opts.py). Nothing here imports models/.

A training run writes, in its checkpoint folder (docs/reproducibility.md, "Interrupts and resume"):
  model.pth (state_dict), optimizer.pth, infos_<id>.pkl, histories_<id>.pkl, and the -best copies,
all plain files at the paths the reference used, plus (ours) the manifest checkpoint_<id>.json.
infos = {iter, epoch, iterators, split_ix, vocab, opt, best_val_score, rng_states (ours: every rank's generators),
model_fingerprint, optimizer_step, K, caption_model, vocab_sha1}; histories = {val_result_history, loss_history,
lr_history, ss_prob_history}. `load_run` reads and checks all of it for --start_from; `CheckpointSaver` writes it.

Save protocol (save_checkpoint), so that a kill -9 at any instant leaves one consistent set:
  1. every file of the save is written to a hidden temp file beside it (.model.pth.XXXX.tmp), fsync'ed;
  2. the manifest checkpoint_<id>.json, listing each file with its temp name, size and sha1, is written to its own
     temp file, fsync'ed and renamed into place (then the folder is fsync'ed): THE commit point;
  3. each temp file is renamed onto its final name, then the folder is fsync'ed.
A kill before 2 leaves the previous files untouched (the new temps are stale and removed by the next save); a kill
during 3 leaves a committed manifest whose remaining temps recover_checkpoint() renames (train.py --start_from and
the next save call it), which completes the save. Nothing is ever written with non-finite weights.
Infos also record what they belong to: model_fingerprint (sha1 of the state_dict), optimizer_step, K,
caption_model, vocab_sha1; check_infos_match() compares them (files without them, e.g. the reference's, pass).
Written files get the permissions 0666 & ~umask, like any file the user creates.
Loads never execute code: tensors through torch.load(weights_only=True), pickles through an unpickler that
admits only what infos/histories legitimately hold.
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import tempfile
import time

import numpy as np
import torch

from misc.train import optim
from misc.files import atomic
from misc.errors import CheckpointError, SaticError
from misc.files.safe_load import load_torch
from misc.files.vocabulary import vocab_sha1
from misc.run.infos import make_infos, model_config, read_infos
from misc.run.runfolder import checkpoint_files



# The classes an infos/histories pickle may name. Anything else is refused.
def unwrap(model):
    """The bare model inside DistributedDataParallel, if wrapped."""
    return model.module if hasattr(model, 'module') else model


# ----------------------------------------------------------------------------------------------- what infos record
def state_fingerprint(state_dict):
    """sha1 over a state_dict's sorted names, dtypes, shapes and bytes: the same for the saved model.pth, the file
    loaded back, and the model it was loaded into (whatever device)."""
    sha1 = hashlib.sha1()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not torch.is_tensor(value):
            sha1.update(repr((key, value)).encode('utf-8'))
            continue
        value = value.detach().cpu().contiguous()
        sha1.update(f'{key}|{value.dtype}|{tuple(value.shape)}|'.encode('utf-8'))
        sha1.update(value.reshape(-1).view(torch.uint8).numpy())
    return sha1.hexdigest()


def optimizer_step(state):
    """The number of updates an optimizer state_dict has made: Noam's '_step', else Adam's per-parameter 'step'
    (their maximum); None when it does not say (a fresh or step-less optimiser)."""
    if not isinstance(state, dict):
        return None
    if isinstance(state.get('optimizer_state_dict'), dict):  # misc.train.optim.PlateauOpt
        state = state['optimizer_state_dict']
    if '_step' in state:
        return int(state['_step'])
    steps = [float(s['step']) for s in (state.get('state') or {}).values() if isinstance(s, dict) and 'step' in s]
    return int(max(steps)) if steps else None


def describe(infos, state_dict, optimizer_state=None):
    """The fields save_checkpoint adds to infos: what the infos belong to."""
    fields = {'model_fingerprint': state_fingerprint(state_dict)}
    if optimizer_state is not None:
        fields['optimizer_step'] = optimizer_step(optimizer_state)
    if infos.get('opt') is not None or infos.get('model_config') is not None:
        config = model_config(infos)
        fields['K'], fields['caption_model'] = config.K, config.caption_model
    if isinstance(infos.get('vocab'), dict):
        fields['vocab_sha1'] = vocab_sha1(infos['vocab'])
    return fields


def check_infos_match(infos, state_dict_or_path=None, optimizer_state=None, vocab=None, config=None,
                      infos_path='the infos file', model_path=None, optimizer_path='optimizer.pth'):
    """Refuse (SaticError, one line) a model, optimizer state, vocabulary or options that are not the ones `infos`
    was saved with. Each check runs only when infos records the field (reference infos record none of them: they
    pass), except the optimizer step, which falls back on infos['iter'] (the reference stepped once per iteration).

    state_dict_or_path: a state_dict, or the path of a model.pth; optimizer_state: an optimizer state_dict;
    vocab: ix_to_word; config: the ModelConfig the model is built with (compared on K and caption_model)."""
    if not isinstance(infos, dict):
        raise SaticError(f'{infos_path} is not an infos file (a dict): pass the infos_<id>.pkl saved with the model')
    where = f" (iteration {infos['iter']})" if 'iter' in infos else ''
    if state_dict_or_path is not None and infos.get('model_fingerprint'):
        if isinstance(state_dict_or_path, (str, os.PathLike)):
            model_path = model_path or str(state_dict_or_path)
            state_dict_or_path = load_model_state(str(state_dict_or_path), 'model')
        if state_fingerprint(state_dict_or_path) != infos['model_fingerprint']:
            raise SaticError(f"{model_path or 'the model'} is not the model {infos_path} was saved with{where}: "
                             f"use the infos file saved together with it (model-best.pth goes with "
                             f"infos_<id>-best.pkl)")
    if optimizer_state is not None:
        found = optimizer_step(optimizer_state)
        expected = infos.get('optimizer_step', infos.get('iter'))
        if found is not None and expected is not None and found != expected:
            raise SaticError(f"{optimizer_path} has made {found} optimiser steps but {infos_path} says "
                             f"{expected}{where}: the files come from different saves; put back the files saved "
                             f"together, or remove {optimizer_path} to resume with a fresh optimiser state")
    if vocab is not None and infos.get('vocab_sha1'):
        if vocab_sha1(vocab) != infos['vocab_sha1']:
            raise SaticError(f'{infos_path} was saved with another vocabulary than this data\'s: use the '
                             'cocotalk.json the checkpoint was trained with')
    if config is not None:
        for key, ours in (('caption_model', config.caption_model), ('K', config.K)):
            if infos.get(key) is not None and ours is not None and infos[key] != ours:
                raise SaticError(f'{infos_path} belongs to a model with {key}={infos[key]}, not {key}={ours}')
    return infos


# ----------------------------------------------------------------------------------------------- reading checkpoint files
def load_model_state(path, what='model'):
    """The state_dict of a model.pth (or an optimizer.pth's state), loaded safely onto the CPU; SaticError, one line
    naming `what` and the file, when it is missing or damaged."""
    return load_torch(path, what)


def write_checkpoint_files(folder, run_id, state_dict, infos, best=False):
    """Plain checkpoint files, as the reference wrote them (no manifest, optimizer or histories; infos as given):
    model.pth and infos_<run_id>.pkl, and with best the -best pair too. For tests and tools that need a checkpoint
    folder without a training run. Returns the path of model.pth."""
    os.makedirs(folder, exist_ok=True)
    state = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state_dict.items()}
    names = [('model.pth', f'infos_{run_id}.pkl')] + ([('model-best.pth', f'infos_{run_id}-best.pkl')] if best else [])
    for model_name, infos_name in names:
        atomic.save_torch(state, os.path.join(folder, model_name))
        atomic.save_pickle(infos, os.path.join(folder, infos_name))
    return os.path.join(folder, 'model.pth')


def default_infos_path(model_path, flag='--teacher_model', hint='pass --teacher_infos PATH'):
    """The infos pkl saved with a checkpoint: DIR/model-best.pth -> DIR/infos_*-best.pkl, DIR/model-<tag>.pth ->
    DIR/infos_*-<tag>.pkl, DIR/model.pth -> DIR/infos_*.pkl (not -best, nor a history copy infos_*-<iter>.pkl that
    has its model-<iter>.pth). Exactly one must fit, else SaticError: '<flag> <model_path>: ...; <hint>'."""
    folder, name = os.path.split(model_path)
    found = sorted(glob.glob(os.path.join(glob.escape(folder or '.'), 'infos_*.pkl')))
    tagged = re.fullmatch(r'model-(.+)\.pth', name)
    if tagged:
        candidates = [p for p in found if p.endswith(f'-{tagged.group(1)}.pkl')]
    elif name == 'model.pth':
        def is_copy(path):
            m = re.search(r'-([^-]+)\.pkl$', os.path.basename(path))
            return bool(m) and (m.group(1) == 'best' or os.path.isfile(os.path.join(folder, f'model-{m.group(1)}.pth')))
        candidates = [p for p in found if not is_copy(p)]
    else:
        raise SaticError(f"{flag} {model_path}: not a model.pth / model-best.pth, so its infos file cannot be "
                         f"guessed; {hint}")
    if len(candidates) != 1:
        what = 'no infos file' if not candidates else f"{len(candidates)} infos files ({', '.join(map(os.path.basename, candidates))})"
        raise SaticError(f"{flag} {model_path}: {what} beside it fit; {hint}")
    return candidates[0]


def load_init_from(path, vocab):
    """--init_from's state_dict, checked against the infos file beside it (found as for a teacher; none or several:
    nothing to check): for this model file and, when it records one, for this data's vocabulary (a same-size
    vocabulary in another order would load silently)."""
    state = load_model_state(path, 'model')
    try:
        infos_path = default_infos_path(path)
    except SaticError:
        return state
    infos = read_infos(infos_path, check=False)
    check_infos_match(infos, state, vocab=vocab, infos_path=infos_path, model_path=path)
    if vocab is not None and isinstance(infos.get('vocab'), dict) and infos['vocab'] != vocab:
        raise SaticError(f'--init_from {path}: its infos {infos_path} has another vocabulary than this data: '
                         'initialise from a checkpoint trained on the same cocotalk.json')
    return state


# ----------------------------------------------------------------------------------------------- one save, one commit
def manifest_path(checkpoint_dir, run_id):
    return os.path.join(checkpoint_dir, f'checkpoint_{run_id}.json')


def read_manifest(checkpoint_dir, run_id):
    """The manifest of the last committed save of run_id in checkpoint_dir, or None (none written: e.g. the
    reference's checkpoints, or ours from before manifests)."""
    path = manifest_path(checkpoint_dir, run_id)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
        files = manifest['files']
        for entry in files:
            for key in ('name', 'temp'):
                if os.path.basename(entry[key]) != entry[key] or entry[key] in ('', '.', '..'):
                    raise ValueError(f'{key} {entry[key]!r} is not a file name')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SaticError(f'{path} is damaged ({type(e).__name__}: {e}); remove it to use the files of '
                         f'{checkpoint_dir} as they are') from None
    return manifest


def recover_checkpoint(checkpoint_dir, run_id):
    """Finish the last committed save of run_id: rename onto their final names the temp files its manifest lists
    and that still exist (a kill -9 between its renames). Returns the manifest, or None without one."""
    manifest = read_manifest(checkpoint_dir, run_id)
    if manifest is None:
        return None
    pending = [(entry, os.path.join(checkpoint_dir, entry['temp'])) for entry in manifest['files']]
    pending = [(entry, tmp) for entry, tmp in pending if os.path.exists(tmp)]
    for entry, tmp in pending:
        if os.path.getsize(tmp) != entry['size']:
            raise SaticError(f"{tmp} has {os.path.getsize(tmp)} bytes, not the {entry['size']} that "
                             f"{manifest_path(checkpoint_dir, run_id)} committed: the folder was altered; remove "
                             f"the manifest to use the files as they are")
    for entry, tmp in pending:
        try:
            os.replace(tmp, os.path.join(checkpoint_dir, entry['name']))
        except OSError as e:
            raise SaticError(f"cannot complete the interrupted save of iteration {manifest.get('iter')} in "
                             f"{checkpoint_dir} ({e.strerror or e} renaming {tmp}): make the folder writable "
                             f"and retry") from None
    if pending:
        atomic.fsync_dir(checkpoint_dir)
        print(f"completed the save of iteration {manifest.get('iter')} in {checkpoint_dir} that was interrupted "
              f"after its commit ({len(pending)} file(s) renamed)", flush=True)
    return manifest


def recover_folder(checkpoint_dir):
    """recover_checkpoint for every run id with a manifest in checkpoint_dir (for readers that know a model file but
    not its run id, e.g. eval.py before reading model-best.pth). Returns {run id: manifest}."""
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    ids = [n[len('checkpoint_'):-len('.json')] for n in names if n.startswith('checkpoint_') and n.endswith('.json')]
    return {run_id: recover_checkpoint(checkpoint_dir, run_id) for run_id in sorted(ids)}


def check_writable_dir(folder, flag='--checkpoint_path'):
    """Create folder and write a file there, or raise a one-line SaticError: before training, not at the first save."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.write-test.', suffix='.tmp')
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise SaticError(f'{flag} {folder} is not writable ({e.strerror or e}): fix its permissions or choose '
                         f'another folder') from None


def _nonfinite(tensors):
    """True when a floating tensor holds a nan or inf: one fused max-abs reduction per device and dtype."""
    groups = {}
    for t in tensors:
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    for group in groups.values():
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(group, math.inf)).max())):
            return True
    return False


def _optimizer_tensors(state):
    if isinstance(state, dict):
        for value in state.values():
            yield from _optimizer_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _optimizer_tensors(value)
    elif torch.is_tensor(state):
        yield state


def check_finite(state_dict, optimizer_state=None, what='the model'):
    """Raise CheckpointError when the weights (or the optimiser's moments) hold a nan or inf."""
    if _nonfinite(state_dict.values()):
        key = next(k for k, v in state_dict.items() if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())
                   and not bool(torch.isfinite(v).all()))
        raise CheckpointError(f'{what}: the weights are not finite (nan or inf in {key})')
    if optimizer_state is not None and _nonfinite(_optimizer_tensors(optimizer_state)):
        raise CheckpointError(f'{what}: the optimiser state is not finite (nan or inf)')


_CHECKPOINT_TEMP = re.compile(r'^\.(model.*\.pth|optimizer\.pth|infos_.*\.pkl|histories_.*\.pkl|checkpoint_.*\.json)'
                              r'\.[^.]+\.tmp$')


def _remove_checkpoint_temps(checkpoint_dir):
    """A checkpoint folder has one writer: the temp files of checkpoint files there are those of killed saves, unless
    a committed manifest still needs them (a save of another run id, cut between its renames)."""
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    keep = set()
    for name in names:
        if name.startswith('checkpoint_') and name.endswith('.json'):
            try:
                keep |= {e['temp'] for e in read_manifest(checkpoint_dir, name[len('checkpoint_'):-len('.json')])
                         ['files']}
            except (SaticError, TypeError):
                pass
    for name in names:
        if _CHECKPOINT_TEMP.match(name) and name not in keep:
            try:
                os.remove(os.path.join(checkpoint_dir, name))
            except OSError:
                pass


def save_checkpoint(checkpoint_dir, run_id, model, optimizer, infos, histories, best=False, history_iter=None,
                    replace=False):
    """Write model/optimizer/infos/histories (and the -best copies of model and infos when best; model-<iter>.pth and
    infos_<id>-<iter>.pkl with history_iter) as ONE commit (module docstring): a kill -9 at any instant leaves the
    previous set or this one. Refuses (CheckpointError, nothing written) non-finite weights; a full disk or another
    write error raises CheckpointError naming the file, with the previous checkpoint intact. replace (--overwrite_run
    1, the run's first save): afterwards, the folder's other checkpoint files are removed (_remove_replaced).
    Adds to infos: model_fingerprint, optimizer_step, K, caption_model, vocab_sha1 (describe). Returns the infos."""
    state = unwrap(model).state_dict()
    optimizer_state = optimizer.state_dict()
    try:
        previous = recover_checkpoint(checkpoint_dir, run_id)  # a save of this run cut between its renames
    except SaticError:
        previous = None  # a damaged manifest: this save replaces it
    kept = (f"; {checkpoint_dir} keeps its previous checkpoint (iteration {previous.get('iter')})" if previous
            else f'; the previous files in {checkpoint_dir} are kept')
    try:
        check_finite(state, optimizer_state, f"refusing to save iteration {infos.get('iter')} to {checkpoint_dir}")
    except CheckpointError as e:
        raise CheckpointError(f'{e}{kept}') from None
    state = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state.items()}
    infos = {**infos, **describe(infos, state, optimizer_state)}
    path = lambda name: os.path.join(checkpoint_dir, name)  # noqa: E731
    write_torch = lambda obj: lambda f: torch.save(obj, f)  # noqa: E731
    write_pickle = lambda obj: lambda f: pickle.dump(obj, f, protocol=2)  # noqa: E731
    items = [(path('model.pth'), write_torch(state)), (path('optimizer.pth'), write_torch(optimizer_state)),
             (path(f'histories_{run_id}.pkl'), write_pickle(histories)),
             (path(f'infos_{run_id}.pkl'), write_pickle(infos))]
    if history_iter is not None:
        items += [(path(f'model-{history_iter}.pth'), write_torch(state)),
                  (path(f'infos_{run_id}-{history_iter}.pkl'), write_pickle(infos))]
    if best:
        items += [(path('model-best.pth'), write_torch(state)), (path(f'infos_{run_id}-best.pkl'), write_pickle(infos))]
    manifest_file = manifest_path(checkpoint_dir, run_id)
    _remove_checkpoint_temps(checkpoint_dir)

    written = atomic.write_temp_files(items, kept)  # 1. the new files, under temp names
    manifest_tmp = None
    try:  # (a second Ctrl-C, KeyboardInterrupt, may land anywhere before the commit: the temps go)
        manifest = {'format': 'satic-checkpoint/1', 'id': run_id, 'iter': infos.get('iter'),
                    'epoch': infos.get('epoch'), 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                    'files': [{'name': os.path.basename(p), 'temp': os.path.basename(tmp), 'size': size,
                               'sha1': sha1} for p, tmp, size, sha1 in written]}
        body = json.dumps(manifest, indent=1).encode('utf-8')
        (_, manifest_tmp, _, _), = atomic.write_temp_files([(manifest_file, lambda f: f.write(body))], kept)
        os.replace(manifest_tmp, manifest_file)  # 2. THE commit point
    except BaseException as e:
        atomic.remove_quietly([tmp for _, tmp, _, _ in written] + [manifest_tmp])
        if isinstance(e, OSError):
            raise CheckpointError(f'{e.strerror or e} writing {manifest_file}{kept}') from None
        raise
    atomic.fsync_dir(checkpoint_dir)
    for final, tmp, _, _ in written:  # 3. into place; a kill here is completed by recover_checkpoint
        os.replace(tmp, final)
    atomic.fsync_dir(checkpoint_dir)
    if replace:
        _remove_replaced(checkpoint_dir, {os.path.basename(final) for final, _, _, _ in written}
                         | {os.path.basename(manifest_file)})
    return infos


def _remove_replaced(checkpoint_dir, kept):
    """--overwrite_run 1, after the run's first save: the checkpoint files of the run it replaces (any not written
    by that save: other ids' infos, histories and manifests, model-<iter>.pth...) are removed."""
    atomic.remove_quietly(os.path.join(checkpoint_dir, name) for name in checkpoint_files(checkpoint_dir)
                          if name not in kept)
    atomic.fsync_dir(checkpoint_dir)


def verify_checkpoint(checkpoint_dir, run_id):
    """[names of the files that differ from the last committed manifest] (size or sha1); [] when all match or when
    there is no manifest. For tests and by-hand checks; resuming relies on the fingerprints in infos instead."""
    manifest = read_manifest(checkpoint_dir, run_id)
    differing = []
    for entry in (manifest or {}).get('files', ()):
        path = os.path.join(checkpoint_dir, entry['name'])
        sha1 = hashlib.sha1()
        try:
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 20), b''):
                    sha1.update(block)
        except OSError:
            differing.append(entry['name'])
            continue
        if os.path.getsize(path) != entry['size'] or sha1.hexdigest() != entry['sha1']:
            differing.append(entry['name'])
    return differing


# ----------------------------------------------------------------------------------------------- a run on disk
# Options that must agree between a run and the checkpoint it resumes (the reference asserted the first three).
MUST_MATCH = ('caption_model', 'rnn_size', 'num_layers', 'input_encoding_size', 'att_feat_size', 'K')
HISTORIES = ('val_result_history', 'loss_history', 'lr_history', 'ss_prob_history')


def rng_state(device):
    """This process's random-number generators (torch CPU, CUDA of `device`, numpy, random), picklable with
    protocol 2 and loadable by the restricted unpickler."""
    state = {'torch': torch.get_rng_state().numpy().tobytes(), 'numpy': np.random.get_state(),
             'random': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def set_rng_state(state, device):
    """Put back the generators of rng_state(device)."""
    torch.set_rng_state(torch.frombuffer(bytearray(state['torch']), dtype=torch.uint8))
    np.random.set_state(state['numpy'])
    random.setstate(state['random'])
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state['cuda']), dtype=torch.uint8), device)


@dataclasses.dataclass
class ResumePoint:
    """Where training is after a completed iteration: what infos record so that a resumed run continues exactly
    (iteration, epoch, the loader's position and order, this rank's generators). Taken after each completed
    iteration only, so that an interrupt in the middle of one saves a state that resumes exactly (not one batch
    ahead)."""
    iteration: int
    epoch: int
    loader: dict  # DataLoader.state_dict(): {'iterators', 'split_ix'}
    rng: dict  # rng_state() of this rank


def histories_of(saved=None):
    """The four histories (iteration -> value dicts) of a saved histories pickle, empty ones where it has none."""
    saved = saved or {}
    return {key: saved.get(key, {}) for key in HISTORIES}


@dataclasses.dataclass
class SavedRun:
    """A run as its checkpoint folder holds it (--start_from), read and checked by load_run; train.py restores it
    piece by piece into the model, the optimiser, the loader and the generators it builds."""
    folder: str
    run_id: str
    infos: dict
    histories: dict

    @property
    def infos_path(self):
        return os.path.join(self.folder, f'infos_{self.run_id}.pkl')

    @property
    def iteration(self):
        return self.infos.get('iter', 0)

    @property
    def epoch(self):
        return self.infos.get('epoch', 0)

    @property
    def optimizer_step(self):
        """Updates made so far: < iteration after skipped (non-finite) updates; the reference's infos say iter."""
        steps = self.infos.get('optimizer_step')
        return self.iteration if steps is None else steps

    @property
    def loader_state(self):
        """DataLoader.load_state_dict's argument, or None when infos lack the position."""
        if self.infos.get('iterators') is None or self.infos.get('split_ix') is None:
            return None
        return {'iterators': self.infos['iterators'], 'split_ix': self.infos['split_ix']}

    @property
    def seed(self):
        return getattr(self.infos.get('opt'), 'seed', None)

    @property
    def validation_pending(self):
        """The saved iteration's validation was cut short (CheckpointSaver.save): the resumed run redoes it."""
        return self.infos.get('validation_pending') == self.iteration and self.iteration is not None

    @property
    def model_path(self):
        return os.path.join(self.folder, 'model.pth')

    def check_model(self, model):
        """Refuse the model restored from model.pth (models.loading.restore_model) when it is not the one the infos
        were saved with (when the infos record its fingerprint)."""
        check_infos_match(self.infos, model.state_dict(), infos_path=self.infos_path, model_path=self.model_path)
        return model

    def restore_optimizer(self, optimizer):
        """optimizer.pth's state into optimizer, when the file exists (else the optimiser starts afresh); refuses
        an optimizer.pth of another save. Returns whether a state was loaded."""
        path = os.path.join(self.folder, 'optimizer.pth')
        if not os.path.isfile(path):
            return False
        # reference quirk: the saved param_groups (betas, eps of a Noam stage 1 included) replace the new ones;
        # the lr is set again at the start of every epoch.
        state = load_model_state(path, 'optimizer')
        if 'optimizer_state_dict' in state and not isinstance(optimizer, optim.PlateauOpt):
            state = state['optimizer_state_dict']  # a --reduce_on_plateau run resumed without it
        optimizer.load_state_dict(state)
        check_infos_match(self.infos, optimizer_state=optimizer.state_dict(), infos_path=self.infos_path,
                          optimizer_path=path)
        return True

    def restore_scaler(self, scaler):
        """--fp16: the gradient scaler's scale and growth count as saved (a run saved without --fp16 has none: the
        scaler then starts afresh)."""
        if self.infos.get('grad_scaler'):
            scaler.load_state_dict(self.infos['grad_scaler'])

    def restore_rng(self, rank, world_size, device):
        """This rank's generators as they were after the saved iteration; False when the run saved none for this
        number of ranks (the draws then restart from the seed)."""
        saved = self.infos.get('rng_states')
        if not (saved and len(saved) == world_size and saved[rank]):
            return False
        set_rng_state(saved[rank], device)
        return True


def load_run(folder, run_id, config, vocab, input_json='the cocotalk.json'):
    """The run `run_id` saved in folder (--start_from), checked against this run's ModelConfig and vocabulary (of
    input_json, named in the message).

    Refuses (SaticError, one line) a folder without infos_<run_id>.pkl, options of MUST_MATCH that disagree, and
    another vocabulary, K or caption model (check_infos_match). A save cut between its renames must have been
    completed first (recover_checkpoint, by one process). Returns a SavedRun: its infos and histories; the model
    and optimizer files are read (and checked against the infos) when restored."""
    saved = SavedRun(folder, run_id, {}, {})
    if not os.path.isfile(saved.infos_path):
        raise SaticError(f"--start_from {folder}: no infos_{run_id}.pkl there; --id must name the run "
                         f"saved in that folder (save/copy_model.sh renames it when you copy a run)")
    saved.infos = read_infos(saved.infos_path, advice=f'the run in {folder} is damaged; restore its '
                             f'infos_{run_id}.pkl or start a new run')
    theirs_config = model_config(saved.infos)
    for key in MUST_MATCH:
        ours, theirs = getattr(config, key), getattr(theirs_config, key)
        if ours != theirs:
            raise SaticError(f"--{key} {ours} disagrees with the checkpoint in {folder} "
                             f"(trained with {key}={theirs}): use the same value or another folder")
    if saved.infos.get('vocab') is not None and saved.infos['vocab'] != vocab:
        raise SaticError(f"the vocabulary of {saved.infos_path} differs from {input_json}: "
                         f"resume with the cocotalk.json the checkpoint was trained with")
    check_infos_match(saved.infos, vocab=vocab, config=config, infos_path=saved.infos_path)
    histories_path = os.path.join(folder, f'histories_{run_id}.pkl')
    saved.histories = read_histories(histories_path) if os.path.isfile(histories_path) else {}
    return saved


def read_histories(path):
    """A histories pickle, checked: a dict whose HISTORIES entries are {iteration: value} dicts (else one line)."""
    histories = read_infos(path, check=False)
    bad = [key for key in HISTORIES if isinstance(histories, dict) and not isinstance(histories.get(key, {}), dict)]
    if not isinstance(histories, dict) or bad:
        what = f'its {bad[0]} is a {type(histories[bad[0]]).__name__}' if bad else f'a {type(histories).__name__}'
        raise SaticError(f'{path} is not a histories file (a dict of {{iteration: value}} dicts; {what}): restore '
                         'it, or remove it to resume without the histories')
    return histories


class CheckpointSaver:
    """Writes the checkpoints of one run (rank 0): model, optimiser, infos and histories as one commit
    (save_checkpoint), the -best pair when asked, and model-<iter>.pth with --save_history_ckpt."""

    def __init__(self, folder, run_id, model, optimizer, vocab, recorded_options, config, save_history_ckpt=False,
                 scaler=None, replace=False):
        """vocab: ix_to_word; recorded_options: the run's options as infos record them ({name: value}, written as
        the reference's infos['opt'] Namespace: data here, not read); config: the model's ModelConfig (infos
        'model_config'); save_history_ckpt: every save also keeps
        model-<iter>.pth and infos_<id>-<iter>.pkl (--save_history_ckpt); scaler: --fp16's torch.amp.GradScaler,
        whose scale infos record too (ours: 'grad_scaler'); replace: the first save replaces the checkpoint files
        the folder held (--overwrite_run 1)."""
        self.folder, self.run_id, self.model, self.optimizer = folder, run_id, model, optimizer
        self.vocab, self.recorded_options, self.save_history_ckpt = vocab, recorded_options, save_history_ckpt
        self.scaler, self.replace, self.config = scaler, replace, config

    def save(self, point, best_val_score, histories, rng_states, best=False, validation_pending=False):
        """Save the state at `point` (a ResumePoint); rng_states: every rank's generators, or None when they are
        not known; validation_pending: the validation of point was due but cut short (infos
        'validation_pending': its iteration; a resume redoes it). Returns the infos written."""
        infos = make_infos(self.recorded_options, self.config, self.vocab, point.iteration, point.epoch, best_val_score,
                           position=point.loader, rng_states=rng_states)
        if validation_pending:
            infos['validation_pending'] = point.iteration
        if self.scaler is not None:
            infos['grad_scaler'] = dict(self.scaler.state_dict())
        history_iter = point.iteration if self.save_history_ckpt else None
        infos = save_checkpoint(self.folder, self.run_id, self.model, self.optimizer, infos, histories, best,
                                history_iter, replace=self.replace)
        self.replace = False
        return infos
