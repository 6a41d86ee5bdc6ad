"""The evaluation stage: decode a split batch by batch, time the decoding alone, optionally score the teacher-forced
loss. Used by eval.py, eval_cocotest.py and train.py's validation; the COCO metrics are misc.eval.coco_eval's
`language_eval`, and the callers write the files (README, "The COCO recipe").

Each image is decoded once, from its one copy of features (the loader's batches hold one per image), a batch going
to the device whole (asynchronously from the loader's pinned memory on CUDA). Sharded over ranks, each reads and
decodes whole batches.
"""
import dataclasses
import itertools
import sys
import time

import torch

from misc.errors import SaticError
from misc.console.progress import Progress
from misc.utils import autocast, decode_sequence, synchronize


@dataclasses.dataclass
class EvalResult:
    """predictions: [{'image_id', 'caption'[, 'file_path']}] in split order; positions: their indices in the
    split (to merge the shards of several ranks); beams: per prediction its beam captions (keep_beams) or None;
    loss: mean teacher-forced loss (with crit) or None; timing: seconds, images, batch_size, beam_size,
    ms_per_image of the decoding alone; loss_parts: per batch with a loss, (its first image's position, its loss),
    to merge the shards' losses into the one of a single process."""
    predictions: list
    positions: list
    beams: list
    loss: float
    timing: dict
    loss_parts: list = dataclasses.field(default_factory=list)


@torch.no_grad()
def evaluate(model, loader, split, config, *, num_images=-1, batch_size=None, remove_bad_endings=False, crit=None,
             bf16=False, fp16=False, keep_beams=False, with_paths=False, verbose=False, verbose_beam=True,
             shard=(0, 1), attention_top=0, progress=None):
    """Decode `split` with `config` (models.decode_config.DecodeConfig).

    num_images: the first images of the split (-1: all); shard (rank, world_size): this process reads and decodes
    the batches whose number is rank modulo world_size (whole batches: the per-batch losses, and so their mean, are
    those of one process); bf16 / fp16: autocast type; verbose: print each caption, and with verbose_beam (eval.py
    --verbose_beam, the reference's option) its beams; attention_top N > 0 (eval.py --dump_attention): each
    prediction also gets 'words' and 'attention', the N regions each word attended to most (region_attention);
    progress: a name, to show the images done, their rate and the time left on stdout
    (misc.console.progress.Progress: a bar on a terminal, else a line every minute and one at the end; rank 0 only,
    counting every rank's batches).
    Returns an EvalResult."""
    print_beams = verbose and verbose_beam
    if num_images == 0:
        raise SaticError('--num_images 0: nothing to evaluate (-1: the whole split)')
    rank, world_size = shard
    batch_size = batch_size or loader.batch_size
    device = next(model.parameters()).device
    vocab = loader.get_vocab()
    seq_per_img = loader.seq_per_img
    precision = autocast(device.type, bf16, fp16)
    was_training = model.training
    model.eval()
    loader.reset_iterator(split)
    predictions, positions, beams = [], [], []
    losses, loss_parts, seen, decode_seconds = [], [], 0, 0.0  # losses: one device scalar per batch, read at the end
    bar = None  # the Progress, once the first batch tells the split's size
    for number in itertools.count():
        mine = number % world_size == rank  # this shard's batch: read and decoded here
        data = loader.get_batch(split, batch_size, load=mine)
        it_max = data['bounds']['it_max']
        limit = it_max if num_images < 0 else min(num_images, it_max)
        # A batch that runs past the limit (or wraps to the split's start) decodes only the images still due.
        n = min(len(data['infos']), limit - seen)
        if bar is None and progress and rank == 0:
            bar = Progress(limit, progress, 'images', final=True, file=sys.stdout)
        if mine and n > 0:
            att = data['att_feats'].to(device, non_blocking=True)[:n]  # (B, N, F): one copy of each image
            att_masks = data['att_masks']
            masks = None if att_masks is None else att_masks.to(device, non_blocking=True)[:n]  # (B, N)
            if crit is not None and data['labels'] is not None:
                with precision:
                    losses.append(_teacher_forcing_loss(model, crit, att, masks, data, n, seq_per_img))
                loss_parts.append(seen)
            synchronize(device)
            start = time.perf_counter()
            with precision:
                decoded = model.decode(att, masks, config)
            seq = decoded.seq  # (B, max_length)
            synchronize(device)
            decode_seconds += time.perf_counter() - start
            if attention_top > 0:  # outside the timed decoding
                with precision:
                    attention = region_attention(model, att, masks, seq, attention_top, vocab)
            captions = decode_sequence(vocab, seq, remove_bad_endings)
            image_beams = _beam_captions(vocab, decoded.hypotheses, config.beam_size, remove_bad_endings) \
                if keep_beams or print_beams else [None] * len(captions)
            for i, caption, caption_beams in zip(range(n), captions, image_beams):
                shown = caption_beams if print_beams else None
                predictions.append(_prediction(data['infos'][i], caption, shown, with_paths, verbose))
                if attention_top > 0:
                    predictions[-1].update(attention[i])
                positions.append(seen + i)
                beams.append(caption_beams if keep_beams else None)
        seen += n
        if bar is not None:
            bar.update(n)
        if seen >= limit:
            break
    if bar is not None:
        bar.close()
    if was_training:
        model.train()
    timing = {'seconds': decode_seconds, 'images': len(predictions), 'batch_size': batch_size,
              'beam_size': config.beam_size, 'ms_per_image': 1000.0 * decode_seconds / max(len(predictions), 1)}
    loss_values = torch.stack(losses).tolist() if losses else []  # one host synchronisation for every batch
    loss = sum(loss_values) / len(loss_values) if loss_values else None
    return EvalResult(predictions, positions, beams, loss, timing, list(zip(loss_parts, loss_values)))


def region_attention(model, att, masks, seq, top, vocab):
    """Per image of the batch: {'words': its decoded words up to the first 0, 'attention': per word the `top`
    regions of the last decoder layer's cross-attention (heads averaged), strongest first, as [region, weight]}
    (model.region_attention over seq (B, T); region = the row of the image's features and boxes)."""
    weights, _ = model.region_attention(att, masks, seq)  # (B, T, N)
    top_weights, top_regions = weights.float().topk(min(top, weights.size(2)), dim=2)  # (B, T, top) each
    out = []
    for words, regions, values in zip(seq.tolist(), top_regions.tolist(), top_weights.tolist()):
        length = words.index(0) if 0 in words else len(words)
        out.append({'words': [vocab[str(w)] for w in words[:length]],
                    'attention': [[[r, round(v, 4)] for r, v in zip(regions[t], values[t]) if v > 0]
                                  for t in range(length)]})
    return out


def _teacher_forcing_loss(model, crit, att, masks, data, n, seq_per_img):
    """The validation loss of the batch's first n images (att (n, N, F), masks (n, N) or None), their seq_per_img
    captions each, as a device scalar (read once, at the end of the split)."""
    device = att.device
    labels, label_masks = data['labels'][:n * seq_per_img], data['masks'][:n * seq_per_img]  # (n*S, L+2)
    repeat = lambda t: None if t is None else t.repeat_interleave(seq_per_img, dim=0)  # noqa: E731
    logprobs = model(None, repeat(att), labels.to(device, non_blocking=True), repeat(masks))
    return crit(logprobs.float(), labels[:, 1:].to(device, non_blocking=True),
                label_masks[:, 1:].to(device, non_blocking=True)).detach().float()


def _prediction(info, caption, caption_beams, with_paths, verbose):
    """One image's entry of the predictions ({'image_id', 'caption'[, 'file_path']}); printed when verbose, with
    caption_beams (None: not printed)."""
    entry = {'image_id': info['id'], 'caption': caption}
    if with_paths:
        entry['file_path'] = info.get('file_path')
    if verbose:
        print(f"image {info['id']}: {caption}")
        if caption_beams is not None and len(caption_beams) > 1:
            print('\n'.join(f'  beam: {b}' for b in caption_beams))
    return entry


def _beam_captions(vocab, hypotheses, beam_size, remove_bad_endings=False):
    """Per image of the batch just decoded, its beam_size captions (greedy: the one caption), in the order of the
    decoding's returned hypotheses (models.decoding.Decoded): best first, or group after group with diverse beam
    search."""
    return [decode_sequence(vocab, [h['seq'].tolist() for h in image[:beam_size]], remove_bad_endings)
            for image in hypotheses]
