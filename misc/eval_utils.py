"""The evaluation loop, shared by eval.py, eval_cocotest.py and train.py's validation (SPEC.md section 5).

`load_model_for_eval` reads a checkpoint and its infos: the options are infos['opt'] with the evaluation's own
overrides (merge_eval_options), the vocabulary is always infos['vocab']. `eval_split` decodes one split batch by
batch (each image's features once, not seq_per_img times), times the decoding alone, optionally scores the
teacher-forced loss and the COCO metrics, and returns (loss, predictions, lang_stats, timing).
"""
import argparse
import json
import os
import time

import torch

from misc.checkpoint import atomic_write
from misc.errors import SaticError
from misc.utils import decode_sequence, synchronize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json_atomic(obj, path):
    """json.dump through a temp file + rename: an interrupted run never leaves half a JSON."""
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode('utf-8')))


def decode_config(kw, vocab_size=None):
    """The DecodeConfig of evaluation options (a dict of option values); bad values -> SaticError, one line."""
    from models.decode_config import DecodeConfig
    try:
        config = DecodeConfig(sample_max=bool(kw.get('sample_max', 1)), beam_size=int(kw.get('beam_size', 1)),
                              temperature=float(kw.get('temperature', 1.0)), max_length=kw.get('max_length', 20),
                              use_cache=bool(kw.get('use_cache', 1)), length_penalty=kw.get('length_penalty', '') or '',
                              group_size=int(kw.get('group_size', 1)),
                              diversity_lambda=float(kw.get('diversity_lambda', 0.5)),
                              decoding_constraint=bool(kw.get('decoding_constraint', 0)),
                              block_trigrams=bool(kw.get('block_trigrams', 0)))
    except ValueError as e:
        raise SaticError(f'decoding options: {e}') from None
    if vocab_size is not None and config.beam_size > 1 and config.beams_per_group > vocab_size + 1:
        raise SaticError(f'--beam_size {config.beam_size} (with --group_size {config.group_size}) asks for more beams '
                         f'than the {vocab_size + 1} entries of the vocabulary: use a smaller --beam_size')
    return config


@torch.no_grad()
def eval_split(model, loader, eval_kwargs, crit=None, device=None):
    """Decode eval_kwargs['split'] and score it.

    eval_kwargs: split, num_images (-1: all), batch_size, beam_size, sample_max, temperature, max_length,
    length_penalty, language_eval, ref_json, id, verbose, verbose_beam, seq_kd, seq_kd_path, dump_path, bf16.
    Returns (loss or None, predictions [{'image_id', 'caption'}] in split order, lang_stats dict or None,
    timing {'seconds', 'images', 'batch_size', 'beam_size', 'ms_per_image'}).
    """
    split = eval_kwargs.get('split', 'val')
    num_images = eval_kwargs.get('num_images', -1)
    verbose = eval_kwargs.get('verbose', False)
    show_beams = verbose and eval_kwargs.get('verbose_beam', 1)
    seq_kd = eval_kwargs.get('seq_kd', False)
    beam_size = eval_kwargs.get('beam_size', 1)
    batch_size = eval_kwargs.get('batch_size', loader.batch_size)
    device = device or next(model.parameters()).device
    config = decode_config(eval_kwargs)
    remove_bad_endings = bool(eval_kwargs.get('remove_bad_endings', 0))
    seq_per_img = loader.seq_per_img
    vocab = loader.get_vocab()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(eval_kwargs.get('bf16', 0)))
    if num_images == 0:
        raise SaticError('--num_images 0: nothing to evaluate (-1: the whole split)')

    was_training = model.training
    model.eval()
    loader.reset_iterator(split)
    predictions, beam_lists = [], []
    loss_sum, loss_batches = 0.0, 0
    decode_seconds = 0.0
    while True:
        data = loader.get_batch(split, batch_size)
        it_max = data['bounds']['it_max']
        limit = it_max if num_images < 0 else min(num_images, it_max)
        # A batch that runs past the limit (or wraps to the split's start) decodes only the images still due.
        n = min(len(data['infos']), limit - len(predictions))
        rows = torch.arange(n) * seq_per_img  # the batch repeats each image seq_per_img times
        att_masks = data['att_masks']
        if crit is not None and data['labels'] is not None:
            ix = torch.arange(n * seq_per_img)
            masks = None if att_masks is None else att_masks[ix].to(device)
            with autocast:
                logprobs = model(data['fc_feats'][ix].to(device), data['att_feats'][ix].to(device),
                                 data['labels'][ix].to(device), masks)
            loss_sum += float(crit(logprobs.float(), data['labels'][ix, 1:].to(device),
                                   data['masks'][ix, 1:].to(device)))
            loss_batches += 1

        fc = data['fc_feats'][rows].to(device)  # (B, Dfc)
        att = data['att_feats'][rows].to(device)  # (B, N, D)
        masks = None if att_masks is None else att_masks[rows].to(device)  # (B, N)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            seq, _ = model.decode(att, masks, config)  # (B, max_length)
        synchronize(device)
        decode_seconds += time.perf_counter() - start

        captions = decode_sequence(vocab, seq, remove_bad_endings)
        beams = _beam_captions(vocab, model, captions, beam_size, remove_bad_endings) if seq_kd or show_beams else None
        for k, (caption, info) in enumerate(zip(captions, data['infos'])):
            entry = {'image_id': info['id'], 'caption': caption}
            if eval_kwargs.get('dump_path', 0):
                entry['file_path'] = info.get('file_path')
            predictions.append(entry)
            if seq_kd:
                beam_lists.append({'image_id': info['id'], 'caption': beams[k]})
            if verbose:
                print(f"image {info['id']}: {caption}")
                if show_beams and beam_size > 1:
                    print('\n'.join(f'  beam: {b}' for b in beams[k]))
        if len(predictions) >= limit:
            break
    if was_training:
        model.train()

    timing = {'seconds': decode_seconds, 'images': len(predictions), 'batch_size': batch_size,
              'beam_size': beam_size, 'ms_per_image': 1000.0 * decode_seconds / max(len(predictions), 1)}
    lang_stats = None
    if eval_kwargs.get('language_eval', 0):
        from misc.coco_eval import language_eval
        out_path = None
        if eval_kwargs.get('id'):
            out_path = os.path.join('eval_results', f"{eval_kwargs['id']}_{split}.json")
        lang_stats, _ = language_eval(predictions, eval_kwargs.get('ref_json'), split_name=split, out_path=out_path,
                                      verbose=eval_kwargs.get('verbose_metrics', True), toolkit_verbose=verbose)
    if seq_kd:
        path = eval_kwargs.get('seq_kd_path') or os.path.join('vis', f"{eval_kwargs.get('id') or 'eval'}_seq_kd.json")
        write_json_atomic(beam_lists, path)
        print(f'wrote the beam lists of {len(beam_lists)} images to {path}')
    loss = loss_sum / loss_batches if loss_batches else None
    return loss, predictions, lang_stats, timing


def _beam_captions(vocab, model, captions, beam_size, remove_bad_endings=False):
    """Per image of the batch just decoded, its beam_size captions (greedy: the one caption), in done_beams order:
    best first, or group after group with diverse beam search."""
    if beam_size == 1:
        return [[c] for c in captions]
    return [decode_sequence(vocab, [b['seq'].tolist() for b in image_beams[:beam_size]], remove_bad_endings)
            for image_beams in model.done_beams]


def check_language_eval_ready(ref_json):
    """Fail before decoding, not after, when the COCO metrics cannot run (no or broken Java, no reference file)."""
    from misc.coco_eval import check_java
    check_java()
    if not ref_json or not os.path.isfile(ref_json):
        raise SaticError(f"--ref_json {ref_json}: reference captions not found; build them with "
                         f"python scripts/prepro_reference_json.py (or pass --language_eval 0)")


# Options that eval.py takes from its own command line (reference_eval_options.tsv and our additions);
# everything else comes from the checkpoint's infos.
_EVAL_OWN = ('id', 'batch_size', 'beam_size', 'language_eval', 'sample_max', 'temperature', 'max_length',
             'length_penalty', 'block_trigrams', 'remove_bad_endings', 'group_size', 'diversity_lambda',
             'decoding_constraint', 'use_cache', 'device', 'bf16', 'compile', 'quantize', 'num_images',
             'split', 'ref_json', 'num_workers', 'seed')
# Data paths: the command line's when given, else the infos' (the reference's `opt.x or infos['opt'].x`).
_PATH_OPTIONS = ('input_json', 'input_fc_dir', 'input_att_dir', 'input_box_dir', 'input_label_h5')


def merge_eval_options(eval_opt, infos, infos_path='infos'):
    """The options a run of eval.py uses: infos['opt'] overridden by the evaluation's own and non-empty paths."""
    from opts import DEFAULT_REF_JSON, check_opt, fill_defaults
    opt = fill_defaults(argparse.Namespace(**vars(infos['opt'])))
    for key in _EVAL_OWN:
        if hasattr(eval_opt, key):
            setattr(opt, key, getattr(eval_opt, key))
    for key in _PATH_OPTIONS:
        if getattr(eval_opt, key, ''):
            setattr(opt, key, getattr(eval_opt, key))
    if opt.ref_json == DEFAULT_REF_JSON and not os.path.isfile(opt.ref_json):
        # The default is relative to the repository (where the reference was always run), not to any cwd.
        opt.ref_json = os.path.join(REPO_ROOT, DEFAULT_REF_JSON)
    opt.vocab_size = len(infos['vocab'])
    for flag in ('image_folder', 'coco_json'):
        if getattr(eval_opt, flag, ''):
            raise SaticError(f"--{flag}: the reference's raw-image mode (a CNN over image files) is not provided; "
                             "extract bottom-up features and pass --input_att_dir (data/README.md)")
    try:
        check_opt(opt)
    except SystemExit as e:  # check_opt's one line, here about the infos file or this command line
        raise SaticError(f"{str(e).removeprefix('error: ')} (options of {infos_path} and this command line)") from None
    decode_config(vars(opt), opt.vocab_size)  # bad decoding options fail now, not after loading the data
    return opt


def load_model_for_eval(eval_opt):
    """Read infos + model, check that they agree; returns (model in eval mode on its device, merged opt, infos,
    device)."""
    import models
    from misc.checkpoint import load_pickle, load_torch
    from misc.utils import resolve_device
    infos = load_pickle(eval_opt.infos_path)
    if not isinstance(infos, dict) or not isinstance(infos.get('opt'), argparse.Namespace) \
            or not isinstance(infos.get('vocab'), dict):
        raise SaticError(f'{eval_opt.infos_path} is not an infos file (a dict with opt and vocab): pass the '
                         'infos_<id>.pkl saved with the checkpoint')
    opt = merge_eval_options(eval_opt, infos, eval_opt.infos_path)
    device = resolve_device(opt.device)
    model = models.setup(opt)
    state = load_torch(eval_opt.model, 'model')
    models.check_state_dict(model, state, eval_opt.model)
    model.to(device).eval()
    from models.speed import apply_eval_options
    model = apply_eval_options(model, opt)  # --quantize int8, --compile 1 (both off by default)
    return model, opt, infos, device


def check_features_fit(loader, opt):
    """The data's region features must have the size the checkpoint was trained on (else: one line, not a
    matrix-shape traceback in the middle of decoding)."""
    if loader.att_feat_size is not None and loader.att_feat_size != opt.att_feat_size:
        raise SaticError(f'--input_att_dir {opt.input_att_dir} has {loader.att_feat_size}-d region features but the '
                         f'checkpoint expects att_feat_size {opt.att_feat_size}: use the features it was trained on')
