"""Tiny datasets for tests, built through the real data scripts (dataset_coco.json -> prepro -> TSV -> features).

    ds = make_tiny_dataset(tmp_path, n_train=8, n_val=3, n_test=3, feat_dim=8)
    loader = DataLoader(DataConfig.from_opt(ds.opt(batch_size=2)))

`ds` holds every path (dataset_json, input_json = cocotalk.json, label_h5, fc_dir, att_dir, box_dir, cached_tokens =
coco-train-idxs.p, ref_json = COCO-format references of every image, and fc/att .lmdb and .h5 copies when asked for
with backends=('dir', 'lmdb', 'h5')). Region features are the demo's "visual concepts" (one region per content word
of the image's captions), so a tiny captioner can learn from them.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

import models
from misc.run.checkpoint import write_checkpoint_files
from misc.options.configs import ModelConfig
from misc.run.infos import make_infos

from scripts import dump_to_lmdb, make_bu_data, prepro_labels, prepro_ngrams, prepro_reference_json
from scripts.make_demo_data import ConceptFeatures

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), 'shared')  # the reference fixtures, beside the checkout


def shared_path(*parts):
    """A fixture under ../shared. Without ../shared (a clone on its own) the tests that need it skip (needs_shared);
    with ../shared there but this fixture missing, collection fails loudly instead of skipping in silence."""
    path = os.path.join(SHARED, *parts)
    if os.path.isdir(SHARED) and not os.path.exists(path):
        raise FileNotFoundError(f'{path} is missing although ../shared is there: restore the fixture '
                                '(tests that need it would otherwise skip without a word)')
    return path


def needs_shared(*parts):
    """pytest mark: skip when ../shared is absent; see shared_path for a missing fixture."""
    shared_path(*parts)
    return pytest.mark.skipif(not os.path.isdir(SHARED), reason=f'../shared is absent (needs {"/".join(parts)})')

WORDS = ('a', 'man', 'woman', 'dog', 'cat', 'red', 'blue', 'ball', 'on', 'the', 'grass', 'table', 'with', 'big',
         'small', 'riding', 'horse', 'street', 'car', 'near')


@dataclasses.dataclass
class TinyDataset:
    root: str
    dataset_json: str
    input_json: str
    label_h5: str
    fc_dir: str
    att_dir: str
    box_dir: str
    cached_tokens: str
    ref_json: str
    feat_dim: int
    vocab_size: int
    fc_lmdb: str = None
    att_lmdb: str = None
    fc_h5: str = None
    att_h5: str = None

    def opt(self, backend='dir', **overrides):
        """train.py options (opts.parse_opt defaults) pointing at this dataset; overrides set any option."""
        import opts
        opt = opts.parse_opt([])
        fc, att = {'dir': (self.fc_dir, self.att_dir), 'lmdb': (self.fc_lmdb, self.att_lmdb),
                   'h5': (self.fc_h5, self.att_h5)}[backend]
        if fc is None:
            raise ValueError(f'backend {backend!r} was not built: pass backends=(..., {backend!r})')
        values = dict(input_json=self.input_json, input_label_h5=self.label_h5, input_fc_dir=fc, input_att_dir=att,
                      input_box_dir=self.box_dir, cached_tokens=self.cached_tokens, ref_json=self.ref_json,
                      att_feat_size=self.feat_dim, fc_feat_size=self.feat_dim, batch_size=2, seq_per_img=5,
                      num_workers=0)
        values.update(overrides)
        for k, v in values.items():
            setattr(opt, k, v)
        return opt


def tiny_dataset_json(n_train, n_val, n_test, n_restval=0, seed=0, captions=(3, 6), length=(3, 20)):
    """A Karpathy-format dataset_coco.json dict with random captions over WORDS.

    Image i has between captions[0] and captions[1] captions (so both the window and the with-replacement paths of
    the loader run) of length[0]..length[1] words (longer than 16: truncation runs too).
    """
    rng = np.random.default_rng(seed)
    images, sentid = [], 0
    splits = ['train'] * n_train + ['val'] * n_val + ['test'] * n_test + ['restval'] * n_restval
    for imgid, split in enumerate(splits):
        cocoid = 1000 + 7 * imgid
        sentences = []
        for _ in range(int(rng.integers(captions[0], captions[1] + 1))):
            tokens = [WORDS[k] for k in rng.integers(0, len(WORDS), int(rng.integers(length[0], length[1] + 1)))]
            sentences.append({'tokens': tokens, 'raw': ' '.join(tokens).capitalize() + '.', 'imgid': imgid,
                              'sentid': sentid})
            sentid += 1
        folder = 'train2014' if split == 'train' else 'val2014'
        images.append({'filepath': folder, 'filename': f'COCO_{folder}_{cocoid:012d}.jpg', 'imgid': imgid,
                       'split': split, 'cocoid': cocoid, 'sentids': [s['sentid'] for s in sentences],
                       'sentences': sentences})
    return {'images': images, 'dataset': 'coco'}


def make_tiny_dataset(tmp_path, n_train=8, n_val=3, n_test=3, feat_dim=8, n_restval=0, boxes=(3, 7), seed=0,
                      word_count_threshold=0, backends=('dir',), captions=(3, 6)):
    """Build a tiny dataset under tmp_path with the real scripts; returns a TinyDataset.

    boxes: (min, max) regions per image (equal numbers: every batch has att_masks None).
    """
    root = str(tmp_path)
    p = lambda name: os.path.join(root, name)  # noqa: E731
    os.makedirs(root, exist_ok=True)
    dataset = tiny_dataset_json(n_train, n_val, n_test, n_restval, seed, captions)
    with open(p('dataset_coco.json'), 'w') as f:
        json.dump(dataset, f)
    prepro_labels.run(prepro_labels.parse_args(
        ['--input_json', p('dataset_coco.json'), '--output_json', p('cocotalk.json'), '--output_h5', p('cocotalk'),
         '--word_count_threshold', str(word_count_threshold)]))
    concepts = ConceptFeatures(feat_dim, seed)
    os.makedirs(p('tsv'), exist_ok=True)
    with open(p('tsv/tiny.tsv'), 'w') as f:
        for img in dataset['images']:
            rng = np.random.default_rng([seed, img['cocoid']])
            n_boxes = int(rng.integers(boxes[0], boxes[1] + 1))
            b, feats = concepts.regions([s['tokens'] for s in img['sentences']], rng, n_boxes=n_boxes)
            f.write(make_bu_data.format_row(img['cocoid'], 640, 480, b, feats))
    make_bu_data.run(make_bu_data.parse_args(
        ['--downloaded_feats', p('tsv'), '--output_dir', p('cocobu'), '--num_workers', '1']))
    prepro_ngrams.run(prepro_ngrams.parse_args(
        ['--input_json', p('dataset_coco.json'), '--dict_json', p('cocotalk.json'), '--output_pkl', p('coco-train')]))
    prepro_reference_json.run(prepro_reference_json.parse_args(
        ['--input_json', p('dataset_coco.json'), '--output_json', p('captions_ref.json')]))
    with open(p('cocotalk.json')) as f:
        vocab_size = len(json.load(f)['ix_to_word'])
    ds = TinyDataset(root=root, dataset_json=p('dataset_coco.json'), input_json=p('cocotalk.json'),
                     label_h5=p('cocotalk_label.h5'), fc_dir=p('cocobu_fc'), att_dir=p('cocobu_att'),
                     box_dir=p('cocobu_box'), cached_tokens=p('coco-train-idxs.p'), ref_json=p('captions_ref.json'),
                     feat_dim=feat_dim, vocab_size=vocab_size)
    for backend in backends:
        if backend == 'dir':
            continue
        for kind in ('fc', 'att'):
            out = p(f'cocobu_{kind}.{backend}')
            dump_to_lmdb.run(dump_to_lmdb.parse_args(
                ['--input_json', ds.input_json, '--folder', getattr(ds, f'{kind}_dir'), '--output_file', out]))
            setattr(ds, f'{kind}_{backend}', out)
    return ds


# ---- tiny checkpoints, COCO references and the reference scorer, error checks (shared by test modules) ----
REFERENCES = {
    101: ['A man riding a wave on top of a surfboard.', 'A surfer rides a large wave in the ocean!',
          'Man on a surf board, riding an ocean wave.'],
    102: ['Two dogs playing with a red frisbee in the grass.', 'A couple of dogs run across a grassy field.'],
    103: ['A plate of food with broccoli and rice', 'A white plate topped with meat, rice and broccoli.',
          "Someone's dinner: chicken, rice and vegetables.", 'A close up of a plate of food'],
    104: ['A red double decker bus driving down a street.', 'A bus on a city street near tall buildings.'],
    105: ['A cat sleeping on a laptop keyboard.', 'A black cat lies on an open laptop computer.'],
}
PREDICTIONS = [
    {'image_id': 103, 'caption': 'a plate of food with rice and broccoli'},
    {'image_id': 101, 'caption': 'a man riding a wave on a surfboard'},
    {'image_id': 999, 'caption': 'an image that is not in the reference file'},
    {'image_id': 105, 'caption': 'a cat laying on a laptop'},
    {'image_id': 102, 'caption': 'two dogs playing in the grass'},
]


def masked_batch(counts=(5, 3, 7, 1), n_max=8, feat=12, seed=1, generator=None):
    """Features (B, n_max, feat) zero padded after each image's count of regions, float 1/0 masks (B, n_max).

    generator: draw from this torch.Generator (e.g. to draw labels after the features), else a fresh one seeded
    with seed."""
    g = generator or torch.Generator().manual_seed(seed)
    att = torch.randn(len(counts), n_max, feat, generator=g)
    masks = torch.zeros(len(counts), n_max)
    for i, n in enumerate(counts):
        masks[i, :n] = 1
        att[i, n:] = 0
    return att, masks


def caption_rows(rows):
    """Reference captions as the loader gives them: word-id lists -> (len(rows), 16) uint32, zero padded."""
    out = np.zeros((len(rows), 16), dtype=np.uint32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# Two images' reference captions (word ids) for the reward tests.
REWARD_GTS = [caption_rows([[1, 2, 3, 4], [1, 2, 5], [6, 2, 3, 4, 7]]),
              caption_rows([[8, 9, 10], [8, 11, 10, 12], [9, 10], [13, 8, 9]])]


def write_reference_json(path):
    images = [{'id': i, 'file_name': 'COCO_val2014_%012d.jpg' % i} for i in REFERENCES]
    annotations = [{'image_id': i, 'id': 1000 * i + k, 'caption': c}
                   for i, caps in REFERENCES.items() for k, c in enumerate(caps)]
    with open(path, 'w') as f:
        json.dump({'images': images, 'annotations': annotations, 'type': 'captions', 'info': {}, 'licenses': []}, f)


def share_one_meteor(monkeypatch):
    """Make pycocoevalcap's Meteor() return one METEOR java process for the whole test (its start-up, loading the
    paraphrase table, takes seconds, 15 on busy cores); returns the list that holds it once started."""
    from pycocoevalcap import eval as cocoeval
    from pycocoevalcap.meteor import meteor
    started, real_meteor = [], meteor.Meteor

    def shared_meteor():
        if not started:
            started.append(real_meteor())
        return started[0]
    monkeypatch.setattr(cocoeval, 'Meteor', shared_meteor)
    monkeypatch.setattr(meteor, 'Meteor', shared_meteor)
    return started


def fake_java(tmp_path, monkeypatch, body):
    """A `java` first on PATH running the shell `body` ("$@" holds java's arguments); returns its path."""
    folder = tmp_path / 'fakebin'
    folder.mkdir()
    java = folder / 'java'
    java.write_text('#!/bin/sh\n' + body + '\n')
    java.chmod(0o755)
    monkeypatch.setenv('PATH', '%s%s%s' % (folder, os.pathsep, os.environ.get('PATH', '')))
    return str(java)


def java_children():
    """Live or zombie java processes whose parent is this test process."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b'java' in cmdline:
            found.append(pid)
    return found


def pycocoevalcap_scores(ref_json, predictions, tmp_path, monkeypatch):
    """The reference's language_eval: COCO API + COCOEvalCap (SPICE stubbed out: its jars cannot be installed)."""
    from pycocoevalcap import eval as cocoeval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return 'SPICE'

    monkeypatch.setattr(cocoeval, 'Spice', NoSpice)
    coco = COCO(ref_json)
    valid = coco.getImgIds()
    cache = tmp_path / 'preds.json'
    cache.write_text(json.dumps([p for p in predictions if p['image_id'] in valid]))
    evaluator = cocoeval.COCOEvalCap(coco, coco.loadRes(str(cache)))
    evaluator.params['image_id'] = evaluator.cocoRes.getImgIds()
    evaluator.evaluate()
    del evaluator.eval['SPICE']
    return evaluator.eval, evaluator.imgToEval


def train_briefly(model, ds, steps=60):
    """A few XE steps on the tiny train split, so that captions (and their metrics) are not degenerate."""
    from dataloader import DataConfig, DataLoader, repeat_per_caption
    from misc.train.losses import LanguageModelCriterion
    crit, optimizer = LanguageModelCriterion(), torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with DataLoader(DataConfig.from_opt(ds.opt(batch_size=5))) as loader:
        for _ in range(steps):
            b = repeat_per_caption(loader.get_batch('train'))
            loss = crit(model(b['fc_feats'], b['att_feats'], b['labels'], b['att_masks']), b['labels'][:, 1:],
                        b['masks'][:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def tiny_checkpoint(ds, folder, vocab=None, model_overrides=None, train_steps=0, **opt_overrides):
    """A tiny SAT (K=2) checkpoint for ds: (model.pth, infos_tiny.pkl) paths.

    Untrained, token 0 (the end) is made to never win, so that every caption is non-empty. model_overrides change
    the saved weights' architecture only (the infos keep opt_overrides): a checkpoint/infos mismatch.
    """
    os.makedirs(folder, exist_ok=True)
    with open(ds.input_json) as f:
        ds_vocab = json.load(f)['ix_to_word']
    opt = ds.opt(caption_model='sat', K=2, num_layers=1, input_encoding_size=16, rnn_size=32, id='tiny',
                 **opt_overrides)
    opt.vocab_size = len(ds_vocab)
    model_opt = argparse.Namespace(**dict(vars(opt), **(model_overrides or {})))
    torch.manual_seed(0)
    model = setup_model(model_opt)
    if train_steps:
        train_briefly(model, ds, train_steps)
    else:
        with torch.no_grad():
            model.model.generator.proj.bias[0] = -10.0
    infos = make_infos(vars(opt), ModelConfig.from_opt(opt), vocab or ds_vocab)
    model_path = write_checkpoint_files(folder, 'tiny', model.state_dict(), infos)
    return model_path, os.path.join(folder, 'infos_tiny.pkl')


def copy_dataset(ds, tmp_path):
    root = str(tmp_path / 'copy')
    shutil.copytree(ds.root, root)
    return root


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    print(msg)
    assert '\n' not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)


# ----------------------------------------------------------------------------------------------- train.py runs
def targs(ds, folder, *extra, run_id='run'):
    """train.py arguments for ds (a TinyDataset): a tiny transformer (dropout on), CPU, no Java; extra overrides."""
    return ['--input_json', ds.input_json, '--input_label_h5', ds.label_h5, '--input_fc_dir', ds.fc_dir,
            '--input_att_dir', ds.att_dir, '--cached_tokens', ds.cached_tokens, '--ref_json', ds.ref_json,
            '--att_feat_size', str(ds.feat_dim), '--caption_model', 'transformer', '--num_layers', '1',
            '--input_encoding_size', '16', '--rnn_size', '32', '--batch_size', '2', '--seq_per_img', '5',
            '--num_workers', '0', '--device', 'cpu', '--language_eval', '0', '--max_epochs', '-1',
            '--losses_log_every', '1', '--checkpoint_path', str(folder), '--id', run_id, *extra]


@contextlib.contextmanager
def working_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


TINY_SAT = dict(vocab_size=12, K=2, d_model=16, d_ff=32, num_layers=1, att_feat_size=8)


def tiny_sat(*args, seed=None, **sizes):
    """The tests' one tiny SATModel factory: SATModel of TINY_SAT's sizes (vocab_size, K, d_model, d_ff,
    num_layers, att_feat_size; any given as arguments win, vocab_size may be positional), in train mode as the
    constructor leaves it; seed: torch.manual_seed(seed) first (None: the generator as it is)."""
    from models.sat import SATModel
    if seed is not None:
        torch.manual_seed(seed)
    if args:
        sizes['vocab_size'], = args
    return SATModel(**{**TINY_SAT, **sizes})


def setup_model(opt):
    """models.setup for an options Namespace, as the entry scripts call it at the edge: its ModelConfig (the options
    it lacks at their defaults, the K rule applied) and vocab_size."""
    from misc.options.configs import ModelConfig
    return models.setup(ModelConfig.from_opt(opt), opt.vocab_size)


def run_main(argv, cwd=None, main=None):
    """train.main(argv) (or another entry point's main: eval.main, a script's main) in cwd (None: here) -> (return
    code, stdout, stderr). The one way tests run an entry point in-process."""
    if main is None:
        import train
        main = train.main
    out, err = io.StringIO(), io.StringIO()
    with working_dir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *fragments):
    """result of run_main: exit 2, one 'error: ...' line holding every fragment (returned), no traceback."""
    rc, _, err = result
    assert rc == 2, err
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_option_refused(argv, *fragments):
    """opts.parse_opt(argv) refuses in one line (train.main prints 'error: <text>' and exits 2) holding every
    fragment; returns the line."""
    import opts
    from misc.errors import SaticError
    with pytest.raises(SaticError) as error:
        opts.parse_opt(argv)
    text = f'error: {error.value}'
    assert '\n' not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


# ----------------------------------------------------------------------------------------------- own images (issue 26)
SMALL_RESNET = (1, 1, 1, 1)  # blocks per stage of the tests' ResNet (prepro_feats offers 101 and 152 only)


def random_resnet_weights(path, layers=SMALL_RESNET, seed=0):
    """A randomly initialised models.resnet.ResNet of `layers`, with random batch-norm statistics (so that every
    BN term matters), saved as a state_dict in torchvision's key names to path; returns the state_dict."""
    from models.resnet import ResNet
    torch.manual_seed(seed)
    net = ResNet(layers)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    state = net.state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)
    return state


def draw_images(folder, names, size=(40, 32), seed=0):
    """Random pictures under folder: names ending .png are saved as PNG, others as JPEG; a name containing 'grey'
    is mode 'L', 'rgba' mode RGBA, else RGB; each has its own colour, plus noise. Returns their paths."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for n, name in enumerate(names):
        mode = 'L' if 'grey' in name else 'RGBA' if 'rgba' in name else 'RGB'
        shape = (size[1] + 8 * (n % 2), size[0]) + (() if mode == 'L' else (len(mode),))
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        base = rng.integers(0, 256, shape[2:] or ())  # each picture its own colour (features that differ), noise
        pixels = np.clip(base + rng.normal(0, 40, shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode).save(path)
        paths.append(path)
    return paths
