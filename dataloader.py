"""Batches of image features and captions for training and evaluation (README, "The COCO recipe"; data/README.md).

Reads what scripts/ produce: cocotalk.json (vocabulary, image list and splits), the label h5 (or none) and the
per-image features through one `FeatureReader` per kind, chosen by path: a directory of <id>.npy / <id>.npz,
an .lmdb file (or folder), or an .h5 file with one dataset per image id.

`DataLoader.get_batch(split)` returns, for B images and S = seq_per_img:
  fc_feats  (B, D) float32, or None (ours: read only with DataConfig.use_fc_feats; no model uses them)
  att_feats (B, N, D) float32, zero padded to the batch's largest N
  att_masks (B, N) float32 1/0, or None when every image of the batch has the same number of boxes
  labels    (B*S, L+2) int64 = [0, w1..wL, 0] (L = seq_length, 16)   masks (B*S, L+2) float32: words + 2 ones
  gts       B int64 arrays (n_captions_i, L): every caption of the image (CIDEr-D reward references)
  infos     [{ix, id, file_path}]   bounds {it_pos_now, it_max, wrapped}   seq_per_img S
Features come once per image (caption rows b*S .. b*S+S-1 belong to image b); the reference repeated them S times
on the host. `repeat_per_caption(batch)` gives that layout, on whatever device the batch is (train.py repeats on
the GPU, after the copy). labels/masks/gts are None with `--input_label_h5 none`. Attributes: vocab_size,
seq_length, ix_to_word, iterators, split_ix (dict split -> image indices), batch_size, seq_per_img, fc_feat_size /
att_feat_size (D of the data; fc_feat_size None without use_fc_feats). With world_size > 1 the train split is
sharded (same shuffled order on every rank, rank r takes slice r). With pin_memory (for a CUDA device) the feature
tensors are in page-locked memory, so that their copies to the GPU (non_blocking) overlap with the work queued there.

Determinism (our design, so that resuming is exact): which captions an image gets and the next epoch's train order
are pure functions of (seed, split, current order, image), never of thread timing or of how many batches ran
before. `state_dict()` = {'iterators', 'split_ix'} (what the reference saved in infos) is therefore enough to
continue exactly where an uninterrupted run would be. The train order is shuffled from the first epoch on
(the reference kept dataset order for epoch 1 and shuffled at each wrap). Features are prefetched by threads.

Every feature array is checked as it is read (FeatureReader.get): finite values, at least one region, and the
feature sizes of the first image read. A bad image is a SaticError naming it and its file (or LMDB/HDF5 key);
raised in a prefetch thread, it reaches the caller unchanged from the get_batch that needs that image.
"""
import collections
import concurrent.futures
import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading

import h5py
import numpy as np
import torch

from misc.options.configs import DEFAULT_SEQ_LENGTH, DataConfig  # noqa: F401 (declared with its options)
from misc.errors import SaticError
from misc.files.folders import UNFINISHED_MARKER, staging_folders
from misc.files.readers import read_array, read_json
from misc.files.vocabulary import check_vocabulary, vocab_sha1

SPLITS = ('train', 'val', 'test')


class FolderFeatures:
    """A folder of <image id>.npy / .npz files (scripts/make_bu_data.py's output)."""

    @staticmethod
    def matches(path):
        return os.path.isdir(path) and not path.rstrip('/').endswith('.lmdb')

    def __init__(self, path, ext, flag):
        self.path, self.ext, self.flag = path, ext, flag
        self.exts = (ext,) + tuple(e for e in ('.npz', '.npy') if e != ext)  # ext first
        if os.path.exists(os.path.join(path, UNFINISHED_MARKER)):
            raise SaticError(f'{flag} {path} is unfinished: scripts/make_bu_data.py was interrupted while '
                             f'writing it ({UNFINISHED_MARKER} is there): run it again')

    def locate(self, key):
        for ext in self.exts:
            source = os.path.join(self.path, key + ext)
            if os.path.exists(source):
                return source, source
        raise SaticError(f'missing feature file {os.path.join(self.path, key + self.ext)} for image {key}: '
                         f'build the features of every image of the json (make_bu_data.py) or fix {self.flag}')

    load = staticmethod(read_array)

    def close(self):
        pass


# The LMDB reader process's program: only the standard library and lmdb. Requests on stdin (4-byte length, key),
# answers on stdout (status V value / N no entry / E error, 8-byte length, bytes).
_LMDB_READER = r"""
import os, struct, sys
import lmdb
path = sys.argv[1]
env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False, meminit=False)
src, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = src.read(4)
    if len(head) < 4:
        break
    key = src.read(struct.unpack('>I', head)[0])
    try:
        with env.begin(write=False) as txn:
            value = txn.get(key)
        status, value = (b'N', b'') if value is None else (b'V', bytes(value))
    except lmdb.Error as e:
        status, value = b'E', ('%s: %s' % (type(e).__name__, e)).encode()
    out.write(status + struct.pack('>Q', len(value)) + value)
    out.flush()
"""


class LmdbReaderProcess:
    """LMDB values read in a child process. LMDB maps its file into memory: a file cut while a job reads it (a
    rewrite in place) makes the next read of a page past its new end a SIGBUS, which no Python code can catch and
    which would kill the job without a word. A size check before each read narrows that window but cannot close it
    (another process may cut the file between the check and the read). Here the mapping lives in the child: if it
    dies, get() raises the error made by `died()` (one line) and the job ends as any bad input does."""

    def __init__(self, path, died):
        self.path, self._died, self.death = path, died, None
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([sys.executable, '-c', _LMDB_READER, path], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def get(self, key):
        """(status b'V' / b'N' / b'E', bytes) of key (str)."""
        with self._lock:
            if self.death is None:
                try:
                    raw = key.encode('ascii')
                    self._proc.stdin.write(struct.pack('>I', len(raw)) + raw)
                    self._proc.stdin.flush()
                    head = self._read(9)
                    if head is not None:
                        payload = self._read(struct.unpack('>Q', head[1:])[0])
                        if payload is not None:
                            return head[:1], payload
                except (BrokenPipeError, OSError):
                    pass
                code = self._proc.wait()
                self.death = f'signal {signal.Signals(-code).name}' if code < 0 else f'exit status {code}'
            raise self._died()

    def _read(self, n):
        data = self._proc.stdout.read(n)
        return data if len(data) == n else None

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()


class LmdbFeatures:
    """An LMDB of npy/npz bytes keyed by image id (scripts/dump_to_lmdb.py's output)."""

    @staticmethod
    def matches(path):
        return path.rstrip('/').endswith('.lmdb')

    def __init__(self, path, ext, flag):
        import lmdb  # (only for .lmdb features: the other backends never pay for it)
        self.path, self.flag, self._error = path, flag, lmdb.Error
        try:
            self._env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False,
                                  readahead=False, meminit=False, max_readers=256)
        except lmdb.Error as e:
            raise SaticError(f'{flag} {path} is not a readable LMDB ({e}): re-create it with '
                             'scripts/dump_to_lmdb.py') from None
        self._check_size()
        self._reader = LmdbReaderProcess(path, lambda: SaticError(
            f'{flag} {self._data_file} was truncated while this job was reading it (its reader process died: '
            f'{self._reader.death}): re-create it with scripts/dump_to_lmdb.py (never in place of a file a job is '
            'reading)'))

    def _check_size(self):
        """A truncated LMDB maps pages past the end of its file: reading them kills the process (SIGBUS). Its
        environment says how many pages it uses; the file must hold them."""
        self._data_file = os.path.join(self.path, 'data.mdb') if os.path.isdir(self.path) else self.path
        self._need = (self._env.info()['last_pgno'] + 1) * self._env.stat()['psize']
        self._check_unchanged(opening=True)

    def _check_unchanged(self, opening=False):
        """Before every read (the file may be cut while a job reads it, e.g. rewritten in place): still every page
        there, else one line instead of SIGBUS. The value is copied out inside the transaction that follows."""
        try:
            size = os.path.getsize(self._data_file)
        except OSError as e:
            size, reason = 0, f'cannot be read any more ({e.strerror or e})'
        else:
            reason = f'is truncated ({size} bytes, its LMDB pages need {self._need})'
        if size < self._need:
            if opening:
                self._env.close()
            when = '' if opening else ' while this job was reading it'
            raise SaticError(f'{self.flag} {self._data_file} {reason}{when}: re-create it with '
                             'scripts/dump_to_lmdb.py (never in place of a file a job is reading)')

    def locate(self, key):
        self._check_unchanged()
        status, payload = self._reader.get(key)
        if status == b'E':  # garbled pages: lmdb.CorruptedError, ...
            raise SaticError(f'{self.path} (image {key}) is corrupt ({payload.decode(errors="replace")}): re-create '
                             'it with scripts/dump_to_lmdb.py')
        if status == b'N':
            raise SaticError(f'{self.path} has no entry for image {key}: re-create it from the full feature '
                             f'folder (scripts/dump_to_lmdb.py) or fix {self.flag}')
        return io.BytesIO(payload), f"{self.path} entry '{key}'"

    load = staticmethod(read_array)

    def close(self):
        self._reader.close()
        self._env.close()


class H5Features:
    """An HDF5 file with one dataset per image id (scripts/dump_to_lmdb.py --format h5)."""

    @staticmethod
    def matches(path):
        return path.endswith(('.h5', '.hdf5'))

    def __init__(self, path, ext, flag):
        self.path, self.flag = path, flag
        self._h5, self._lock = None, threading.Lock()  # opened by the first locate(), to name its image

    def locate(self, key):
        try:
            with self._lock:
                if self._h5 is None:
                    self._h5 = h5py.File(self.path, 'r')
            dataset = self._h5[key] if key in self._h5 else None
        except Exception as e:  # h5py raises various errors on a damaged file
            raise SaticError(f'{self.path} (image {key}) is unreadable ({type(e).__name__}: {e}); '
                             'it may be truncated: re-create it') from None
        if dataset is None:
            raise SaticError(f'{self.path} has no dataset for image {key}: re-create it from the full feature '
                             f'folder or fix {self.flag}')
        return dataset, f"{self.path} dataset '{key}'"

    @staticmethod
    def load(dataset):
        return dataset[()]

    def close(self):
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


# The feature stores, tried in order (a new one: a class with matches/locate/load/close, and a line here).
BACKENDS = (LmdbFeatures, H5Features, FolderFeatures)


class FeatureReader:
    """Per-image float32 arrays from one of the BACKENDS, checked as they are read."""

    def __init__(self, path, ext, flag):
        """path: the --input_*_dir value; ext: '.npy' or '.npz', tried first in a directory; flag: for messages."""
        self.path, self.flag = path, flag
        if not os.path.exists(path):
            if staging_folders(path):
                raise SaticError(f'{flag} {path} does not exist: scripts/make_bu_data.py was interrupted while '
                                 f'building it ({staging_folders(path)[0][0]}): run it again')
            raise SaticError(f'{flag} {path} does not exist: build the features (scripts/make_bu_data.py) '
                             'or fix the path')
        backend = next((b for b in BACKENDS if b.matches(path)), None)
        if backend is None:
            raise SaticError(f'{flag} {path} is neither a directory, an .lmdb nor an .h5 file: fix the path')
        self.backend = backend(path, ext, flag)

    def get(self, image_id, dim=None, regions=False):
        """(N, D) or (D,) float32 array of one image; SaticError naming the file and image id if absent or bad.

        Checked as read (cheap next to the read): finite values; feature size D == dim when given (the size of the
        images read before); regions=True (att features): at least one region."""
        key = str(image_id)
        source, where = self.backend.locate(key)
        try:
            array = np.asarray(self.backend.load(source), dtype=np.float32)
        except Exception as e:  # truncated/corrupt npy, npz, lmdb value or h5 dataset
            raise SaticError(f'{where} (image {key}) is unreadable ({type(e).__name__}: {e}); '
                             'it may be truncated or corrupt: re-create it') from None
        self._check(array, key, where, dim, regions)
        return array

    def _check(self, array, key, where, dim, regions):
        """One line naming the image and its file for features that would crash or poison training later."""
        redo = 'regenerate its features (scripts/make_bu_data.py, then dump_to_lmdb.py for .lmdb/.h5)'
        if array.size == 0 or array.ndim == 0:
            what = 'no regions (0 boxes)' if regions else 'an empty feature vector'
            raise SaticError(f'{where} (image {key}) has {what}, shape {array.shape}: every image needs at least '
                             f'one box; {redo}')
        # (N, D) bottom-up regions, or (a, a, D) grid features (scripts/prepro_feats.py): a*a regions
        if regions and array.ndim not in (2, 3):
            raise SaticError(f'{where} (image {key}) has region features of shape {array.shape}: expected a 2-d '
                             f'array (regions x feature size) or a 3-d grid (prepro_feats.py); {redo}')
        size = array.shape[-1] if regions else array.size
        if dim is not None and size != dim:
            raise SaticError(f'{where} (image {key}) has {size}-d features, shape {array.shape}, but the images read '
                             f'before have {dim}-d ({self.flag}): {redo} with the same extractor')
        if not np.isfinite(array).all():
            bad = np.count_nonzero(~np.isfinite(array))
            raise SaticError(f'{where} (image {key}) holds {bad} NaN/inf values: {redo}')

    def close(self):
        self.backend.close()


def pad_regions(arrays, zeros=torch.zeros):
    """Images' region features [(N_i, D) float32 numpy] as one batch: att (B, N, D) zero-padded to the largest N_i
    and att_masks (B, N) 1/0, or None when every image has the same number of regions (reference quirk: the released
    checkpoints were evaluated so). zeros(*shape): the float32 tensors to fill (the loader's are pinned); one copy
    per image, straight into them."""
    counts = [len(a) for a in arrays]
    att = zeros(len(arrays), max(counts), arrays[0].shape[1])  # (B, N, D)
    masks = zeros(len(arrays), max(counts))  # (B, N)
    for b, array in enumerate(arrays):
        att.numpy()[b, :counts[b]] = array
        masks.numpy()[b, :counts[b]] = 1
    return att, (None if min(counts) == max(counts) else masks)


class DataLoader:
    """Splits, caption sampling, batching and prefetching over one dataset (cocotalk.json + label h5 + features)."""

    def __init__(self, config, rank=0, world_size=1, pin_memory=False):
        """config: a DataConfig (train.py and eval.py build it once, at the edge: DataConfig.from_opt);
        pin_memory: features in page-locked memory (only when a CUDA device will receive them)."""
        if not isinstance(config, DataConfig):
            raise TypeError(f'DataLoader takes a DataConfig (DataConfig.from_opt(options)), not {type(config).__name__}')
        opt = config
        self.opt = opt
        self.batch_size = opt.batch_size
        self.seq_per_img = opt.seq_per_img
        self.norm_att_feat = opt.norm_att_feat
        self.rank, self.world_size = rank, world_size
        self.seed = opt.seed
        self.pin_memory = pin_memory
        if not 0 <= rank < world_size:
            raise SaticError(f'rank {rank} is outside world size {world_size}')

        self._pool, self._readers = None, []
        self.info = read_json(opt.input_json, '--input_json')
        if not isinstance(self.info, dict) or not isinstance(self.info.get('images'), list) \
                or not all(isinstance(img, dict) and 'id' in img for img in self.info['images']):
            raise SaticError(f'--input_json {opt.input_json} has no images[] with ids: expected cocotalk.json from '
                             'scripts/prepro_labels.py')
        bad = next((img for img in self.info['images'] if isinstance(img['id'], bool)
                    or not isinstance(img['id'], (int, str))), None)
        if bad is not None:
            raise SaticError(f'--input_json {opt.input_json}: image id {bad["id"]!r} is not a number or a string: '
                             're-create it with scripts/prepro_labels.py')
        self.images = self.info['images']
        self.ix_to_word = self.info.get('ix_to_word') or {}
        check_vocabulary(self.ix_to_word, f'--input_json {opt.input_json}')
        self.vocab_size = len(self.ix_to_word)

        self.label_h5 = None if str(opt.input_label_h5).lower() == 'none' else opt.input_label_h5
        if self.label_h5 is None:
            self.seq_length = opt.seq_length
            self.labels = self.label_start_ix = self.label_end_ix = None
        else:
            self._load_labels(opt.input_json, self.label_h5)
            self.seq_length = self.labels.shape[1]

        self.fc_loader = None
        if opt.use_fc_feats:
            self.fc_loader = FeatureReader(opt.input_fc_dir, '.npy', '--input_fc_dir')
            self._readers.append(self.fc_loader)
        self.att_dir = opt.input_att_dir
        self.att_loader = FeatureReader(opt.input_att_dir, '.npz', '--input_att_dir')
        self._readers.append(self.att_loader)

        self.split_ix = {s: [] for s in SPLITS}
        for ix, img in enumerate(self.images):
            split = img.get('split')
            if split is None:  # no split: the image serves every split (reference behaviour)
                for s in SPLITS:
                    self.split_ix[s].append(ix)
            elif split in SPLITS:
                self.split_ix[split].append(ix)
            elif not opt.train_only:  # restval (and any other split) trains
                self.split_ix['train'].append(ix)
        num_images = opt.num_images
        if num_images is not None and num_images > 0:
            self.split_ix = {s: ix[:num_images] for s, ix in self.split_ix.items()}
        # Train order: shuffled from the start, the same on every rank (seeded by the data alone).
        self.split_ix['train'] = self._shuffled('train', self.split_ix['train'], token='start')
        self.iterators = {s: 0 for s in SPLITS}
        self._views, self._next = {}, {}
        for s in SPLITS:
            self._refresh(s)
        for s in SPLITS:
            print(f'DataLoader: {len(self.split_ix[s])} images in split {s}'
                  + (f' ({len(self._views[s][0])} on rank {rank} of {world_size})' if s == 'train' and world_size > 1
                     else ''))

        # Fail now, not in the middle of an epoch: read the first image of every split. Every later image must have
        # the feature sizes of the first one (checked as it is read, in _load_item).
        self.fc_feat_size = self.att_feat_size = None  # D of the data, for building a model that fits it
        for s in SPLITS:
            if self.split_ix[s]:
                fc, att, _, _ = self._load_item(s, self.split_ix[s][0], '')
                self.fc_feat_size, self.att_feat_size = None if fc is None else fc.shape[0], att.shape[1]
        self.num_workers = max(0, opt.num_workers)
        self._pending = {s: collections.OrderedDict() for s in SPLITS}
        if self.num_workers > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix='satic-loader')

    # ---- public API (the reference's, plus state_dict / load_state_dict / close) ----

    def get_vocab(self):
        return self.ix_to_word

    def check_att_feat_size(self, expected, what):
        """The region features must have `expected` dimensions (else one line, not a shape error in the model);
        what: who expects it, e.g. 'the checkpoint (att_feat_size)' or '--att_feat_size'."""
        if self.att_feat_size is not None and self.att_feat_size != expected:
            raise SaticError(f'the region features in {self.att_dir} have {self.att_feat_size} dimensions but '
                             f'{what} says {expected}: use matching features, or --att_feat_size {self.att_feat_size}'
                             f' when training from scratch')

    def caption_sampling_note(self, split='train'):
        """A 'note: ...' line when images of split have fewer captions than seq_per_img (theirs are then drawn with
        replacement, so the same caption repeats within a batch), else None."""
        if self.labels is None or not self.split_ix[split]:
            return None
        ix = np.asarray(self.split_ix[split])
        counts = self.label_end_ix[ix] - self.label_start_ix[ix] + 1
        short = int(np.count_nonzero(counts < self.seq_per_img))
        if not short:
            return None
        return (f'note: --seq_per_img {self.seq_per_img}: {short} of {len(ix)} {split} images have fewer captions '
                f'(down to {int(counts.min())}); their captions are drawn with replacement')

    def reset_iterator(self, split):
        """Start `split` again from its first image (same order)."""
        self.iterators[split] = 0
        self._drop_pending(split)

    def state_dict(self):
        """{'iterators', 'split_ix'}: saved in infos; enough to resume exactly (see the module docstring)."""
        return {'iterators': dict(self.iterators), 'split_ix': {s: list(ix) for s, ix in self.split_ix.items()}}

    def load_state_dict(self, state):
        """Restore the positions and orders of a state_dict (or of a reference infos' iterators/split_ix)."""
        if not state:
            return
        iterators, split_ix = state.get('iterators') or {}, state.get('split_ix') or {}
        for s in SPLITS:
            if s not in iterators or s not in split_ix:
                continue
            order = [int(i) for i in split_ix[s]]
            if sorted(order) != sorted(self.split_ix[s]):
                print(f'warning: the saved {s} split lists other images than this data (changed --num_images, '
                      f'--train_only or json?): {s} restarts from its beginning', file=sys.stderr)
                self.iterators[s] = 0
            else:
                self.split_ix[s] = order
                self.iterators[s] = int(iterators[s])
            self._refresh(s)
            if not 0 <= self.iterators[s] < max(1, len(self._views[s][0])):
                self.iterators[s] = 0
            self._drop_pending(s)

    def get_batch(self, split, batch_size=None, load=True):
        """The next batch of `split` (dict described in the module docstring). load=False moves past it reading
        nothing: {'infos', 'seq_per_img', 'bounds'} only (a sharded evaluation skipping the other ranks' batches)."""
        batch_size = batch_size or self.batch_size
        if not self._views[split][0]:
            raise SaticError(f'split {split!r} of {self.opt.input_json} has no images: check the json and --num_images')
        keys, wrapped = [], False
        for _ in range(batch_size):
            key, w = self._advance(split)
            keys.append(key)
            wrapped = wrapped or w
        if load:
            # Queue the batch's images and the next batch's before waiting on any of them.
            self._schedule(split, keys + self._peek(split, 2 * batch_size))
            batch = self._collate([self._collect(split, key) for key in keys])
        else:
            batch = {'infos': self._infos([ix for ix, _ in keys]), 'seq_per_img': self.seq_per_img}
        batch['bounds'] = {'it_pos_now': self.iterators[split], 'it_max': len(self._views[split][0]),
                           'wrapped': wrapped}
        return batch

    def close(self):
        """Stop the worker threads and close the feature files (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for pending in getattr(self, '_pending', {}).values():
            pending.clear()
        for reader in self._readers:
            reader.close()
        self._readers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- labels ----

    def _load_labels(self, json_path, h5_path):
        try:
            with h5py.File(h5_path, 'r') as f:
                for key in ('labels', 'label_start_ix', 'label_end_ix'):
                    if not isinstance(f.get(key), h5py.Dataset):
                        raise SaticError(f'label file {h5_path} has no {key} dataset: re-create it with '
                                         'scripts/prepro_labels.py')
                self.labels = f['labels'][()]
                self.label_start_ix = f['label_start_ix'][()]
                self.label_end_ix = f['label_end_ix'][()]
                attrs = dict(f.attrs)
        except FileNotFoundError:
            raise SaticError(f'label file {h5_path} does not exist: run scripts/prepro_labels.py, or pass '
                             '--input_label_h5 none for images without captions') from None
        except IsADirectoryError:
            raise SaticError(f'label file {h5_path} is a folder: pass the _label.h5 file') from None
        except (OSError, KeyError) as e:
            raise SaticError(f'label file {h5_path} is unreadable or incomplete ({type(e).__name__}: {e}); '
                             'it may be truncated: re-create it with scripts/prepro_labels.py') from None
        self._check_label_arrays(h5_path)
        n = len(self.images)
        if len(self.label_start_ix) != n or len(self.label_end_ix) != n:
            raise SaticError(f'label file {h5_path} has {len(self.label_start_ix)} images but {json_path} has {n}: '
                             'they come from different datasets; rebuild both with scripts/prepro_labels.py '
                             '(or pass --input_label_h5 none)')
        if 'vocab_sha1' in attrs and self.ix_to_word:
            sha = attrs['vocab_sha1']
            sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            if sha != vocab_sha1(self.ix_to_word):
                raise SaticError(f'label file {h5_path} was built with another vocabulary than {json_path}: '
                                 'rebuild it with --dict_json pointing at this json')
        if self.labels.size and int(self.labels.min()) < 0:
            row = int(np.argmax(self.labels.min(axis=1) < 0))
            img = int(np.searchsorted(self.label_end_ix, row + 1))
            raise SaticError(f'label file {h5_path} has word id {int(self.labels.min())} (row {row}, image '
                             f'{self.images[min(img, n - 1)].get("id")}): word ids are 0..vocabulary size; rebuild it '
                             'with scripts/prepro_labels.py')
        if self.labels.size:
            if not self.ix_to_word:
                raise SaticError(f'{json_path} has no ix_to_word vocabulary but {h5_path} has captions: '
                                 'pass the cocotalk.json the labels were built with')
            top = int(self.labels.max())
            if top > self.vocab_size:
                row = int(np.argmax(self.labels.max(axis=1)))
                img = int(np.searchsorted(self.label_end_ix, row + 1))
                raise SaticError(f'label file {h5_path} has word id {top} (image {self.images[img].get("id")}) but '
                                 f'the vocabulary of {json_path} has {self.vocab_size} words: the files do not '
                                 'belong together; rebuild the labels')
        bad = np.nonzero((self.label_end_ix < self.label_start_ix) | (self.label_start_ix < 1)
                         | (self.label_end_ix > len(self.labels)))[0]
        if len(bad):
            raise SaticError(f'label file {h5_path}: image {self.images[bad[0]].get("id")} has no captions '
                             f'(label_start_ix {self.label_start_ix[bad[0]]}, label_end_ix {self.label_end_ix[bad[0]]}'
                             f', rows 1..{len(self.labels)}): rebuild it with scripts/prepro_labels.py')

    def _check_label_arrays(self, h5_path):
        """Shapes and dtypes of the label datasets: labels (M, L) of integers, label_start_ix/label_end_ix (N,) of
        integers; float ids are refused (truncating them would train on other words)."""
        for key, array, ndim in (('labels', self.labels, 2), ('label_start_ix', self.label_start_ix, 1),
                                 ('label_end_ix', self.label_end_ix, 1)):
            if array.dtype.kind not in 'iu':
                raise SaticError(f'label file {h5_path}: {key} holds {array.dtype} values, not integer ids: '
                                 're-create it with scripts/prepro_labels.py')
            if array.ndim != ndim:
                want = '(captions, words)' if ndim == 2 else '(images,)'
                raise SaticError(f'label file {h5_path}: {key} has shape {array.shape}, expected {ndim}-d {want}: '
                                 're-create it with scripts/prepro_labels.py')
        if self.labels.shape[1] < 1:
            raise SaticError(f'label file {h5_path}: labels has shape {self.labels.shape}, 0 words per caption: '
                             're-create it with scripts/prepro_labels.py and --max_length >= 1')
        self.label_start_ix = self.label_start_ix.astype(np.int64)
        self.label_end_ix = self.label_end_ix.astype(np.int64)

    def _captions(self, ix, rng):
        """(seq_per_img, L) label rows of image ix: a contiguous window at a random offset, else with replacement."""
        first, last = self.label_start_ix[ix] - 1, self.label_end_ix[ix] - 1  # 1-indexed inclusive on disk
        n = last - first + 1
        S = self.seq_per_img
        if n < S:
            rows = [rng.randint(first, last) for _ in range(S)]
            return self.labels[rows]
        start = rng.randint(first, last - S + 1)
        return self.labels[start:start + S]

    # ---- order, sharding, positions ----

    def _shuffled(self, split, order, token):
        order = sorted(order)
        random.Random(f'{self.seed}/shuffle/{split}/{token}').shuffle(order)
        return order

    def _view(self, split, order):
        """(this rank's images of `order`, the order's token). Train is sharded over ranks; val/test are whole."""
        if split == 'train' and self.world_size > 1:
            per = len(order) // self.world_size
            if per == 0:
                raise SaticError(f'split train has {len(order)} images, fewer than the {self.world_size} ranks')
            order_view = order[self.rank * per:(self.rank + 1) * per]
        else:
            order_view = order
        token = hashlib.sha1(np.asarray(order, dtype=np.int64).tobytes()).hexdigest()[:16]
        return order_view, token

    def _refresh(self, split):
        self._views[split] = self._view(split, self.split_ix[split])
        self._next[split] = None

    def _next_order(self, split):
        """The order after the current one wraps: train reshuffles (seeded by the current order), val/test stay."""
        if split != 'train':
            return self.split_ix[split]
        if self._next[split] is None:
            self._next[split] = self._shuffled(split, self.split_ix[split], self._views[split][1])
        return self._next[split]

    def _advance(self, split):
        """Take the next image: ((ix, token), wrapped). Wrapping moves train to its next shuffled order."""
        view, token = self._views[split]
        pos = self.iterators[split]
        if not 0 <= pos < len(view):  # e.g. a position set from outside
            pos = 0
        key = (view[pos], token)
        pos += 1
        wrapped = pos >= len(view)
        if wrapped:
            pos = 0
            if split == 'train':
                self.split_ix[split] = self._next_order(split)
                self._refresh(split)
        self.iterators[split] = pos
        return key, wrapped

    def _peek(self, split, n):
        """The keys of the next n images, without moving (crosses at most one epoch boundary)."""
        view, token = self._views[split]
        pos = self.iterators[split]
        keys = [(ix, token) for ix in view[pos:pos + n]]
        if len(keys) < n:
            view, token = self._view(split, self._next_order(split))
            keys += [(ix, token) for ix in view[:n - len(keys)]]
        return keys

    # ---- loading and prefetching ----

    def _load_item(self, split, ix, token):
        """(fc (D,) or None (without use_fc_feats), att (N, D), captions (S, L) or None, ix) of one image; pure
        function of its arguments."""
        iid = self.images[ix]['id']
        att = self.att_loader.get(iid, self.att_feat_size, regions=True)
        att = att.reshape(-1, att.shape[-1])  # (N, D)
        if self.norm_att_feat:
            att = att / np.linalg.norm(att, 2, 1, keepdims=True)
        fc = None if self.fc_loader is None else self.fc_loader.get(iid, self.fc_feat_size).reshape(-1)  # (D,)
        seq = None
        if self.labels is not None:
            seq = self._captions(ix, random.Random(f'{self.seed}/{split}/{token}/{ix}'))
        return fc, att, seq, ix

    def _schedule(self, split, keys):
        if self._pool is None:
            return
        pending = self._pending[split]
        for key in keys:
            if key in pending:
                pending.move_to_end(key)
            else:
                pending[key] = self._pool.submit(self._load_item, split, *key)
        while len(pending) > len(keys):  # forget prefetches nobody will ask for (the batch size changed)
            pending.popitem(last=False)[1].cancel()

    def _collect(self, split, key):
        future = self._pending[split].pop(key, None)
        if future is None:
            return self._load_item(split, *key)
        return future.result()

    def _drop_pending(self, split):
        for future in self._pending[split].values():
            future.cancel()
        self._pending[split].clear()

    def _infos(self, ixs):
        return [{'ix': ix, 'id': self.images[ix]['id'], 'file_path': self.images[ix].get('file_path', '')}
                for ix in ixs]

    def _zeros(self, *shape):
        """A float32 zero tensor, page-locked with pin_memory."""
        return torch.zeros(shape, dtype=torch.float32, device='cpu', pin_memory=self.pin_memory)

    def _collate(self, items):
        S = self.seq_per_img
        B = len(items)
        fc = None if items[0][0] is None else self._zeros(B, items[0][0].shape[0])  # (B, Dfc)
        for b, it in enumerate(items):
            if fc is not None:
                fc.numpy()[b] = it[0]
        att, att_masks = pad_regions([it[1] for it in items], self._zeros)
        batch = {
            'fc_feats': fc, 'att_feats': att, 'att_masks': att_masks,
            'labels': None, 'masks': None, 'gts': None, 'seq_per_img': S, 'infos': self._infos([it[3] for it in items]),
        }
        if self.labels is not None:
            L = self.seq_length
            labels = np.zeros((B * S, L + 2), dtype=np.int64)  # (B*S, L+2): [0, w1..wL, 0]
            labels[:, 1:L + 1] = np.concatenate([it[2] for it in items])
            lengths = (labels != 0).sum(1) + 2  # words + BOS + EOS
            masks_txt = (np.arange(L + 2)[None, :] < lengths[:, None]).astype(np.float32)  # (B*S, L+2)
            batch['labels'] = torch.from_numpy(labels)
            batch['masks'] = torch.from_numpy(masks_txt)
            batch['gts'] = [self.labels[self.label_start_ix[ix] - 1:self.label_end_ix[ix]].astype(np.int64)
                            for ix in (it[3] for it in items)]
        return batch


def repeat_per_caption(batch):
    """The reference's layout of a get_batch batch: fc_feats, att_feats and att_masks repeated seq_per_img times
    (row b*S + s is image b; None stays None), on the batch's device. Returns a new dict."""
    S = batch['seq_per_img']
    repeat = lambda t: None if t is None else t.repeat_interleave(S, dim=0)  # noqa: E731
    return {**batch, 'fc_feats': repeat(batch['fc_feats']), 'att_feats': repeat(batch['att_feats']),
            'att_masks': repeat(batch['att_masks'])}


def attach_boxes(predictions, box_dir, input_json=None):
    """Give each prediction 'boxes', its image's region boxes [[x1, y1, x2, y2], ...] (row r = region r of
    'attention') from box_dir (<id>.npy files, an .lmdb or an .h5: make_bu_data.py's _box output), and
    'image_width' / 'image_height' where input_json's image entry has 'width' / 'height'."""
    sizes = {}
    if input_json:
        sizes = {img.get('id'): (img['width'], img['height'])
                 for img in read_json(input_json, '--input_json').get('images', [])
                 if 'width' in img and 'height' in img}
    reader = FeatureReader(box_dir, '.npy', '--input_box_dir')
    try:
        for p in predictions:
            p['boxes'] = [[round(float(c), 2) for c in box] for box in reader.get(p['image_id'], dim=4, regions=True)]
            if p['image_id'] in sizes:
                p['image_width'], p['image_height'] = sizes[p['image_id']]
    finally:
        reader.close()
