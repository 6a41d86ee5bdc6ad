"""Caption from Python: a trained SATIC run as one object (docs/own_images.md, example.ipynb).

    from captioner import Captioner
    cap = Captioner.from_run('save/demo-nsc-sat-2-from-nsc-seqkd')        # or .from_checkpoint(model.pth[, infos])
    cap.caption(['data/cocobu_att/42.npz', regions])                     # feature files or (N, D)/(a, a, D) arrays
    cap.caption(regions, beam_size=3)                                    # one image -> one caption
    cap.caption_images(['photo.jpg'])                                    # ResNet grid features first (misc/images.py)
    cap.caption(regions, attention=True)  # {'caption', 'words', 'attention' (words, regions)} per image

The run is loaded exactly as eval.py loads it (evaluator.load_checkpoint: the infos beside the model, the checkpoint
checked against them, device, --bf16, --quantize, ...), and images are decoded as eval.py decodes a split
(misc.eval.evaluation.evaluate: the same batches, padding and masks, autocast and decoding options), so the captions are
eval.py's for the same features and options. Options are eval.py's flags without the dashes, given to from_run /
from_checkpoint (device='cpu', bf16=1, beam_size=3, batch_size=32, ...); decoding options can also be given to each
caption() call. Also `torch.hub.load(repo_dir, 'captioner', 'save/<id>', source='local')` (hubconf.py).
"""
import argparse
import os
import sys

import numpy as np
import torch

from dataloader import pad_regions
from misc.errors import SaticError
from misc.files.atomic import write_json
from misc.viewer.visualize import write_index_html

__all__ = ['Captioner', 'caption_folder']


def eval_options(model_path, infos_path=None, **options):
    """eval.py's options Namespace for one checkpoint: its parser's defaults, no metrics, then `options` (eval.py's
    flag names); an unknown name is a SaticError naming it."""
    from opts import parse_eval_opt
    eval_opt = parse_eval_opt(['--model', str(model_path), '--infos_path', str(infos_path or ''),
                               '--language_eval', '0'])
    for name, value in options.items():
        if not hasattr(eval_opt, name):
            raise SaticError(f"unknown option {name}={value!r}: use eval.py's option names (python eval.py --help)")
        setattr(eval_opt, name, value)
    return eval_opt


class Captioner:
    """A loaded captioner with its vocabulary and options: features or image files in, captions out."""

    def __init__(self, model, opt, infos, eval_opt=None):
        """model, opt, infos: evaluator.load_checkpoint's (model in eval mode on its device, resolved options, infos);
        eval_opt: the options it was loaded with (the CNN options of caption_images)."""
        self.model, self.opt, self.infos = model, opt, infos
        self.vocab = infos['vocab']
        self.eval_opt = eval_opt or argparse.Namespace()
        self._extractors = {}

    @classmethod
    def from_checkpoint(cls, model_path, infos=None, **options):
        """The run of model_path (a model.pth / model-best.pth); infos: its infos pkl (default: the one saved
        beside it, infos_<id>.pkl / infos_<id>-best.pkl); options: eval.py's (device='cpu', beam_size=3, ...)."""
        from evaluator import load_checkpoint  # the one way eval.py, eval_ensemble.py and this API load a run
        eval_opt = eval_options(model_path, infos, **options)
        return cls(*load_checkpoint(eval_opt), eval_opt=eval_opt)

    @classmethod
    def from_run(cls, folder, best=True, **options):
        """A run folder (save/<id>/): its model-best.pth (best=True, when there is one), else its model.pth."""
        folder = str(folder)
        if not os.path.isdir(folder):
            raise SaticError(f'{folder}: not a run folder (save/<id>/ holding model-best.pth or model.pth)')
        names = ['model-best.pth', 'model.pth'] if best else ['model.pth']
        found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
        if not found:
            raise SaticError(f"{folder} holds no {' or '.join(names)}: pass a run folder of train.py, or "
                             'Captioner.from_checkpoint(model_path, infos_path)')
        return cls.from_checkpoint(found[0], **options)

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ---- features -> captions ----
    def regions(self, item):
        """One image's features as the data loader gives them: (N, att_feat_size) float32 numpy, from a feature file
        (.npz 'feat' / .npy), or an array / tensor of shape (N, D) or (a, a, D) (grid features)."""
        from misc.files.readers import read_array
        where = str(item) if isinstance(item, (str, os.PathLike)) else 'an array'
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise SaticError(f'{item}: feature file not found (an .npz with key feat, or an .npy)')
            try:
                item = read_array(item)
            except Exception as e:
                raise SaticError(f'{item}: not a readable .npy/.npz feature file ({type(e).__name__}: {e})') from None
        array = (item.detach().float().cpu().numpy() if torch.is_tensor(item) else np.asarray(item, np.float32))
        if array.ndim not in (2, 3) or array.size == 0:
            raise SaticError(f'{where}: features of shape {array.shape}; one image is '
                             f'(regions, {self.opt.att_feat_size}) '
                             f'or a grid (a, a, {self.opt.att_feat_size}); pass a list for several images')
        array = array.reshape(-1, array.shape[-1]).astype(np.float32, copy=False)  # (N, D)
        if array.shape[1] != self.opt.att_feat_size:
            raise SaticError(f'{where}: {array.shape[1]}-d features, but this model reads {self.opt.att_feat_size}-d '
                             '(the features it was trained on)')
        if not np.isfinite(array).all():
            raise SaticError(f'{where}: features hold NaN/inf values: recompute them')
        if self.opt.norm_att_feat:  # as the data loader
            array = array / np.linalg.norm(array, 2, 1, keepdims=True)
        return array

    def _decoding(self, decoding):
        """(resolved options with the call's decoding options, DecodeConfig)."""
        from opts import decode_config, decoding_option_names
        unknown = [name for name in decoding if name not in decoding_option_names()]
        if unknown:
            raise SaticError(f"unknown decoding option(s) {', '.join(unknown)}: use "
                             f"{', '.join(decoding_option_names())}")
        opt = argparse.Namespace(**{**vars(self.opt), **decoding})
        return opt, decode_config(opt, opt.vocab_size)

    @torch.no_grad()
    def caption(self, features, attention=False, batch_size=None, seed=None, **decoding):
        """Captions of images' features. features: one image (a feature file path, or an (N, D) / (a, a, D) array)
        -> one result; a list of them -> a list. A result is the caption (str), or with attention=True a dict
        {'caption', 'words', 'attention': (len(words), N) float32, per word its last-decoder-layer cross-attention
        over the image's N regions, heads averaged}. decoding: eval.py's decoding options (beam_size=3,
        max_length=16, ...); batch_size: images decoded together (default eval.py's --batch_size); seed: reseed
        torch first (for sample_max=0)."""
        from misc.utils import autocast, decode_sequence
        one = not isinstance(features, (list, tuple))
        arrays = [self.regions(item) for item in ([features] if one else features)]
        opt, config = self._decoding(decoding)
        if seed is not None:
            torch.manual_seed(seed)
        batch_size = batch_size or opt.batch_size
        results = []
        for start in range(0, len(arrays), batch_size):
            att, masks = pad_regions(arrays[start:start + batch_size])  # as the data loader batches them
            att, masks = att.to(self.device), None if masks is None else masks.to(self.device)
            with autocast(self.device.type, opt.bf16):
                seq, _ = self.model.decode(att, masks, config)  # (B, T)
            captions = decode_sequence(self.vocab, seq, bool(opt.remove_bad_endings))
            if not attention:
                results += captions
                continue
            with autocast(self.device.type, opt.bf16):
                weights, _ = self.model.region_attention(att, masks, seq)  # (B, T, N)
            weights = weights.float().cpu().numpy()
            for row, (caption, tokens) in enumerate(zip(captions, seq.tolist())):
                length = tokens.index(0) if 0 in tokens else len(tokens)
                n = len(arrays[start + row])
                results.append({'caption': caption, 'words': [self.vocab[str(t)] for t in tokens[:length]],
                                'attention': weights[row, :length, :n]})
        return results[0] if one else results

    # ---- image files -> captions ----
    def extractor(self, cnn_model=None, cnn_weights=None, att_size=None):
        """The ResNet grid-feature extractor (models.resnet.load_extractor) on this captioner's device, loaded once;
        defaults: eval.py's (resnet101, data/imagenet_weights/resnet101.pth relative to the working directory, the
        grid of the run's training features (trained_grid), else 14)."""
        from models.resnet import load_extractor
        key = (cnn_model or getattr(self.eval_opt, 'cnn_model', '') or 'resnet101',
               cnn_weights or getattr(self.eval_opt, 'cnn_weights', '') or None,
               att_size or getattr(self.eval_opt, 'att_size', 0) or self.trained_grid() or 14)
        if key not in self._extractors:
            self._extractors[key] = load_extractor(*key, device=self.device)
        return self._extractors[key]

    def trained_grid(self):
        """a of the (a, a, D) grid features this run was trained on (one .npz of its --input_att_dir, when that
        folder is still there), else None (bottom-up regions, or not found)."""
        from misc.files.readers import read_array
        folder = getattr(self.opt, 'input_att_dir', '')
        if not folder or not os.path.isdir(folder):
            return None
        with os.scandir(folder) as entries:
            sample = next((e.path for e in entries if e.name.endswith('.npz')), None)
        try:
            shape = read_array(sample).shape if sample else ()
        except Exception:  # a damaged file: the loader names it when it matters
            return None
        return shape[0] if len(shape) == 3 and shape[0] == shape[1] else None

    def image_features(self, paths, extractor=None, skip_unreadable=False):
        """[(fc (2048,), att (a, a, 2048)) or None] of image files (misc.images.grid_features; as
        scripts/prepro_feats.py writes them). An unreadable file: SaticError, or with skip_unreadable one line on
        stderr and None."""
        import sys
        from misc.images import grid_features, read_image
        extractor = extractor or self.extractor()
        images = []
        for path in paths:
            try:
                images.append(read_image(path))
            except SaticError as e:
                if not skip_unreadable:
                    raise
                print(f'skipped: {e}', file=sys.stderr, flush=True)
                images.append(None)
        kept = [i for i, image in enumerate(images) if image is not None]
        out = [None] * len(images)
        for i, feats in zip(kept, grid_features(extractor, [images[i] for i in kept])):
            out[i] = feats
        return out

    def caption_images(self, paths, cnn_model=None, cnn_weights=None, att_size=None, skip_unreadable=False,
                       **decoding):
        """Captions of image files (a path -> a caption, a list -> a list; None for a skipped unreadable file with
        skip_unreadable): their ResNet grid features (see extractor), then caption(); decoding as caption()'s.
        Meaningful only for a model trained on such features (docs/own_images.md)."""
        one = isinstance(paths, (str, os.PathLike))
        paths = [paths] if one else list(paths)
        extractor = self.extractor(cnn_model, cnn_weights, att_size)
        if extractor.cnn.fc.in_features != self.opt.att_feat_size:
            raise SaticError(f'this model reads {self.opt.att_feat_size}-d features, not the {cnn_model or "resnet"}'
                             f"'s {extractor.cnn.fc.in_features}-d grid features: caption images with a model "
                             'trained on scripts/prepro_feats.py features (docs/own_images.md)')
        batch_size = decoding.pop('batch_size', None) or self.opt.batch_size
        results = []
        for start in range(0, len(paths), batch_size):  # a batch of images at a time: features stay small
            feats = self.image_features(paths[start:start + batch_size], extractor, skip_unreadable)
            kept = [att for att in (f[1] if f else None for f in feats) if att is not None]
            captions = iter(self.caption(kept, batch_size=batch_size, **decoding) if kept else [])
            results += [next(captions) if f else None for f in feats]
        return results[0] if one else results


# ----------------------------------------------------------------------------------------------- eval.py --image_folder
def image_entries(eval_opt):
    """[(image id, path)] of --image_folder: every file under it, numbered 1.. in path order (the reference's ids),
    or the images --coco_json lists, under their ids. Files without an image extension: one line each, left out."""
    from misc.images import coco_json_images, folder_images
    if eval_opt.coco_json:
        if not os.path.isdir(eval_opt.image_folder):
            raise SaticError(f'--image_folder {eval_opt.image_folder}: not a folder; pass the folder that holds '
                             'the images of --coco_json')
        return coco_json_images(eval_opt.coco_json, eval_opt.image_folder)
    images, others = folder_images(eval_opt.image_folder)
    for path in others:
        print(f'skipped: {path}: not an image file (by its extension)', file=sys.stderr)
    if not images:
        raise SaticError(f'--image_folder {eval_opt.image_folder}: no image files (.jpg, .png, ...) under it')
    return list(enumerate(images, 1))


def caption_folder(eval_opt, loaded=None):
    """--image_folder: caption its image files (their ResNet grid features, computed in memory as
    scripts/prepro_feats.py computes them) with the checkpoint's model and this command line's decoding options,
    through the Captioner API; returns (opt, predictions [{image_id, caption, file_path}]). Unreadable files: one
    line each, skipped. No references, no metrics."""
    entries = image_entries(eval_opt)
    if eval_opt.num_images > 0:
        entries = entries[:eval_opt.num_images]  # --num_images N: the first N, as for a split
    if eval_opt.language_eval:
        print('--image_folder: no references, so no COCO metrics (--language_eval is not used)', flush=True)
    torch.manual_seed(eval_opt.seed)
    from evaluator import load_checkpoint  # (lazy, as from_checkpoint)
    model, opt, infos = loaded or load_checkpoint(eval_opt)
    captioner = Captioner(model, opt, infos, eval_opt)
    predictions = []
    paths = [path for _, path in entries]
    captions = captioner.caption_images(paths, skip_unreadable=True)
    for (iid, path), caption in zip(entries, captions):
        if caption is not None:
            predictions.append({'image_id': iid, 'caption': caption,
                                'file_path': os.path.relpath(path, eval_opt.image_folder)})
            if eval_opt.verbose:
                print(f'image {iid} ({path}): {caption}')
    skipped = len(entries) - len(predictions)
    print(f'captioned {len(predictions)} images of {eval_opt.image_folder}' + (f' ({skipped} skipped)' * bool(skipped)))
    if not predictions:
        raise SaticError(f'--image_folder {eval_opt.image_folder}: none of its images could be read (listed above)')
    return opt, predictions


def write_image_outputs(eval_opt, opt, predictions):
    """--image_folder's files: vis/<id>.json, and with --dump_images 1 vis/index.html showing the images."""
    if eval_opt.dump_json:
        path = os.path.join('vis', f'{opt.id}.json')
        write_json(predictions, path)
        print(f'wrote {len(predictions)} captions to {path}')
    if eval_opt.dump_images:
        files = {p['image_id']: os.path.join(eval_opt.image_folder, p['file_path']) for p in predictions}
        path = write_index_html(predictions, opt.id, opt.split, opt.beam_size, opt.ref_json, image_files=files)
        print(f'wrote the caption viewer to {path}')


def image_output_folders(eval_opt):
    """The folders --image_folder writes into (vis/, vis/imgs/), checked before anything is loaded."""
    return [('vis', 'vis/ (--dump_json 1)')] * bool(eval_opt.dump_json) + \
        [('vis', 'vis/ (--dump_images 1)'), (os.path.join('vis', 'imgs'), 'vis/imgs/ (--dump_images 1)')] * \
        bool(eval_opt.dump_images)
