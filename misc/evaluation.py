"""The evaluation stage: decode a split batch by batch, time the decoding alone, optionally score the teacher-forced
loss. Used by eval.py, eval_cocotest.py and train.py's validation; the COCO metrics are misc.coco_eval's
`language_eval`, and the callers write the files (README, "Using it on COCO").

Each image is decoded once, from one copy of its features (the loader repeats every image seq_per_img times).
"""
import dataclasses
import time

import torch

from misc.errors import SaticError
from misc.utils import decode_sequence, synchronize


@dataclasses.dataclass
class EvalResult:
    """predictions: [{'image_id', 'caption'[, 'file_path']}] in split order; positions: their indices in the
    split (to merge the shards of several ranks); beams: per prediction its beam captions (keep_beams) or None;
    loss: mean teacher-forced loss (with crit) or None; timing: seconds, images, batch_size, beam_size,
    ms_per_image of the decoding alone."""
    predictions: list
    positions: list
    beams: list
    loss: float
    timing: dict


@torch.no_grad()
def evaluate(model, loader, split, config, *, num_images=-1, batch_size=None, remove_bad_endings=False, crit=None,
             bf16=False, keep_beams=False, with_paths=False, verbose=False, shard=(0, 1)):
    """Decode `split` with `config` (models.decode_config.DecodeConfig).

    num_images: the first images of the split (-1: all); shard (rank, world_size): this process decodes the
    images whose split position is rank modulo world_size (the loader still reads every batch: decoding, not
    reading, is the cost); verbose: print each caption (and its beams). Returns an EvalResult."""
    if num_images == 0:
        raise SaticError('--num_images 0: nothing to evaluate (-1: the whole split)')
    rank, world_size = shard
    batch_size = batch_size or loader.batch_size
    device = next(model.parameters()).device
    vocab = loader.get_vocab()
    seq_per_img = loader.seq_per_img
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16))
    was_training = model.training
    model.eval()
    loader.reset_iterator(split)
    predictions, positions, beams = [], [], []
    loss_sum, loss_batches, seen, decode_seconds = 0.0, 0, 0, 0.0
    while True:
        data = loader.get_batch(split, batch_size)
        it_max = data['bounds']['it_max']
        limit = it_max if num_images < 0 else min(num_images, it_max)
        # A batch that runs past the limit (or wraps to the split's start) decodes only the images still due.
        n = min(len(data['infos']), limit - seen)
        mine = [i for i in range(n) if (seen + i) % world_size == rank]
        if mine:
            rows = torch.tensor(mine) * seq_per_img  # (B,): one copy of each image
            att_masks = data['att_masks']
            if crit is not None and data['labels'] is not None:
                caption_rows = (rows.unsqueeze(1) + torch.arange(seq_per_img)).reshape(-1)  # (B*S,)
                masks = None if att_masks is None else att_masks[caption_rows].to(device)
                with autocast:
                    logprobs = model(None, data['att_feats'][caption_rows].to(device),
                                     data['labels'][caption_rows].to(device), masks)
                loss_sum += float(crit(logprobs.float(), data['labels'][caption_rows, 1:].to(device),
                                       data['masks'][caption_rows, 1:].to(device)))
                loss_batches += 1
            att = data['att_feats'][rows].to(device)  # (B, N, F)
            masks = None if att_masks is None else att_masks[rows].to(device)  # (B, N)
            synchronize(device)
            start = time.perf_counter()
            with autocast:
                seq, _ = model.decode(att, masks, config)  # (B, max_length)
            synchronize(device)
            decode_seconds += time.perf_counter() - start
            captions = decode_sequence(vocab, seq, remove_bad_endings)
            image_beams = _beam_captions(vocab, model, captions, config.beam_size, remove_bad_endings) \
                if keep_beams or verbose else [None] * len(captions)
            for i, caption, caption_beams in zip(mine, captions, image_beams):
                info = data['infos'][i]
                entry = {'image_id': info['id'], 'caption': caption}
                if with_paths:
                    entry['file_path'] = info.get('file_path')
                predictions.append(entry)
                positions.append(seen + i)
                beams.append(caption_beams if keep_beams else None)
                if verbose:
                    print(f"image {info['id']}: {caption}")
                    if config.beam_size > 1:
                        print('\n'.join(f'  beam: {b}' for b in caption_beams))
        seen += n
        if seen >= limit:
            break
    if was_training:
        model.train()
    timing = {'seconds': decode_seconds, 'images': len(predictions), 'batch_size': batch_size,
              'beam_size': config.beam_size, 'ms_per_image': 1000.0 * decode_seconds / max(len(predictions), 1)}
    loss = loss_sum / loss_batches if loss_batches else None
    return EvalResult(predictions, positions, beams, loss, timing)


def _beam_captions(vocab, model, captions, beam_size, remove_bad_endings=False):
    """Per image of the batch just decoded, its beam_size captions (greedy: the one caption), in done_beams order:
    best first, or group after group with diverse beam search."""
    if beam_size == 1:
        return [[c] for c in captions]
    return [decode_sequence(vocab, [b['seq'].tolist() for b in image_beams[:beam_size]], remove_bad_endings)
            for image_beams in model.done_beams]
