"""The evaluation loop, shared by eval.py, eval_cocotest.py and train.py's validation.

eval_split decodes one split image by image batch (features of each image once, not seq_per_img times),
times the decoding alone, optionally scores the teacher-forced loss and the COCO metrics, and returns
(loss, predictions, lang_stats, timing).
"""
import json
import os
import time

import torch

from misc.checkpoint import atomic_write
from misc.errors import SaticError
from misc.utils import decode_sequence, synchronize


def write_json_atomic(obj, path):
    """json.dump through a temp file + rename: an interrupted run never leaves half a JSON."""
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode('utf-8')))


def _decode_options(kw):
    return {'sample_max': kw.get('sample_max', 1), 'beam_size': kw.get('beam_size', 1),
            'temperature': kw.get('temperature', 1.0), 'max_length': kw.get('max_length', 20),
            'use_cache': kw.get('use_cache', 1)}


@torch.no_grad()
def eval_split(model, loader, eval_kwargs, crit=None, device=None):
    """Decode eval_kwargs['split'] and score it.

    eval_kwargs: split, num_images (-1: all), beam_size, sample_max, temperature, max_length, language_eval,
    ref_json, id, verbose, verbose_beam, seq_kd, dump_path, bf16.
    Returns (loss or None, predictions [{'image_id', 'caption'}], lang_stats dict or None, timing dict).
    """
    split = eval_kwargs.get('split', 'val')
    num_images = eval_kwargs.get('num_images', -1)
    verbose = eval_kwargs.get('verbose', False)
    beam_size = eval_kwargs.get('beam_size', 1)
    batch_size = eval_kwargs.get('batch_size', loader.batch_size)
    device = device or next(model.parameters()).device
    decode_opt = _decode_options(eval_kwargs)
    seq_per_img = loader.seq_per_img
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(eval_kwargs.get('bf16', 0)))

    was_training = model.training
    model.eval()
    loader.reset_iterator(split)
    predictions, beam_lists = [], []
    loss_sum, loss_batches = 0.0, 0
    decode_seconds, decoded_images = 0.0, 0
    vocab = loader.get_vocab()
    n = 0
    while True:
        data = loader.get_batch(split, batch_size)
        n_in_batch = len(data['infos'])
        n += n_in_batch
        att_masks = data['att_masks']
        if crit is not None and data.get('labels') is not None:
            with autocast:
                logprobs = model(data['fc_feats'].to(device), data['att_feats'].to(device),
                                 data['labels'].to(device), None if att_masks is None else att_masks.to(device))
            loss_sum += float(crit(logprobs.float(), data['labels'][:, 1:].to(device),
                                   data['masks'][:, 1:].to(device)))
            loss_batches += 1
        # The batch repeats each image seq_per_img times; decode each image once.
        rows = torch.arange(n_in_batch) * seq_per_img
        fc = data['fc_feats'][rows].to(device)
        att = data['att_feats'][rows].to(device)
        masks = None if att_masks is None else att_masks[rows].to(device)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            seq, _ = model(fc, att, masks, opt=decode_opt, mode='sample')
        synchronize(device)
        decode_seconds += time.perf_counter() - start
        decoded_images += n_in_batch
        captions = decode_sequence(vocab, seq)
        done_beams = getattr(model, 'done_beams', None) if beam_size > 1 else None
        for k, (caption, info) in enumerate(zip(captions, data['infos'])):
            entry = {'image_id': info['id'], 'caption': caption}
            if eval_kwargs.get('dump_path', 0):
                entry['file_path'] = info.get('file_path')
            predictions.append(entry)
            if done_beams is not None and (eval_kwargs.get('seq_kd') or (verbose and eval_kwargs.get('verbose_beam'))):
                beams = [decode_sequence(vocab, b['seq'].unsqueeze(0))[0] for b in done_beams[k]]
                if eval_kwargs.get('seq_kd'):
                    beam_lists.append({'image_id': info['id'], 'caption': beams[:beam_size]})
                if verbose and eval_kwargs.get('verbose_beam'):
                    print('\n'.join(f'  beam: {b}' for b in beams))
            if verbose:
                print(f"image {info['id']}: {caption}")
        limit = data['bounds']['it_max'] if num_images < 0 else min(num_images, data['bounds']['it_max'])
        if data['bounds']['wrapped'] or n >= limit:
            break
    # The last batch may run past the limit (or wrap to the split's start): drop the surplus.
    del predictions[limit:]
    del beam_lists[limit:]
    if was_training:
        model.train()

    timing = {'seconds': decode_seconds, 'images': decoded_images, 'batch_size': batch_size,
              'beam_size': beam_size, 'ms_per_image': 1000.0 * decode_seconds / max(decoded_images, 1)}
    lang_stats = None
    if eval_kwargs.get('language_eval', 0):
        from misc.coco_eval import language_eval
        out_path = None
        if eval_kwargs.get('id'):
            out_path = os.path.join('eval_results', f"{eval_kwargs['id']}_{split}.json")
        lang_stats, _ = language_eval(predictions, eval_kwargs.get('ref_json'), split_name=split, out_path=out_path,
                                      verbose=eval_kwargs.get('verbose_metrics', True))
    if eval_kwargs.get('seq_kd'):
        path = eval_kwargs.get('seq_kd_path') or os.path.join('vis', f"{eval_kwargs.get('id', 'eval')}_seq_kd.json")
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        write_json_atomic(beam_lists, path)
        print(f'wrote the beam lists of {len(beam_lists)} images to {path}')
    loss = loss_sum / loss_batches if loss_batches else None
    return loss, predictions, lang_stats, timing


def check_language_eval_ready(ref_json):
    """Fail before decoding, not after, when the COCO metrics cannot run (no Java, no reference file)."""
    from misc.coco_eval import JAVA_MISSING, java_available
    if not java_available():
        raise SaticError(JAVA_MISSING)
    if not ref_json or not os.path.isfile(ref_json):
        raise SaticError(f"--ref_json {ref_json}: reference captions not found; build them with "
                         f"python scripts/prepro_reference_json.py (or pass --language_eval 0)")


# Options that eval.py takes from its own command line; everything else comes from the checkpoint's infos.
_EVAL_OWN = ('id', 'batch_size', 'beam_size', 'start_from', 'language_eval', 'sample_max', 'temperature',
             'max_length', 'use_cache', 'device', 'bf16', 'num_images', 'split', 'ref_json', 'num_workers', 'seed')
_PATH_OPTIONS = ('input_json', 'input_fc_dir', 'input_att_dir', 'input_box_dir', 'input_label_h5')


def merge_eval_options(eval_opt, infos):
    """The options a run of eval.py uses: infos['opt'] overridden by the evaluation's own and non-empty paths."""
    import argparse
    from opts import check_opt, fill_defaults
    opt = fill_defaults(argparse.Namespace(**vars(infos['opt'])))
    for key in _EVAL_OWN:
        if hasattr(eval_opt, key):
            setattr(opt, key, getattr(eval_opt, key))
    for key in _PATH_OPTIONS:
        if getattr(eval_opt, key, ''):
            setattr(opt, key, getattr(eval_opt, key))
    opt.vocab_size = len(infos['vocab'])
    check_opt(opt)
    return opt


def load_model_for_eval(eval_opt):
    """Read infos + model, check that they agree, and return (model on its device, merged opt, infos)."""
    import models
    from misc.checkpoint import load_pickle, load_torch
    from misc.utils import resolve_device
    infos = load_pickle(eval_opt.infos_path)
    opt = merge_eval_options(eval_opt, infos)
    device = resolve_device(opt.device)
    model = models.setup(opt)
    state = load_torch(eval_opt.model, 'model')
    models.check_state_dict(model, state, eval_opt.model)
    model.to(device).eval()
    return model, opt, infos, device
