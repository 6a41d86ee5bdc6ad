"""Evaluate a trained captioner on a split: captions, COCO metrics and decoding latency (SPEC.md section 5).

  python eval.py --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl --batch_size 1 --beam_size 1

Options not on the command line come from the checkpoint's infos; the vocabulary always does. Writes (relative to
the working directory, as the reference) vis/<id>.json ([{image_id, caption}]), with --language_eval 1
eval_results/<id>_<split>.json, with --seq_kd 1 every image's beams (vis/<id>_seq_kd.json), with --dump_images 1
the caption viewer vis/index.html.
"""
import os
import sys

import torch

from misc.errors import SaticError


def run_evaluation(eval_opt):
    """Load the checkpoint, decode the split, score it; returns (opt, predictions, lang_stats, timing).

    Everything that can be checked before decoding is (checkpoint vs infos, Java and references, feature size).
    """
    from dataloader import DataLoader
    from misc.eval_utils import check_features_fit, check_language_eval_ready, eval_split, load_model_for_eval
    from misc.losses import build_criterion

    torch.manual_seed(eval_opt.seed)
    model, opt, infos, device = load_model_for_eval(eval_opt)
    if opt.language_eval:
        check_language_eval_ready(opt.ref_json)
    with DataLoader(opt) as loader:
        check_features_fit(loader, opt)
        loader.ix_to_word = infos['vocab']  # the vocabulary always comes from the checkpoint
        kwargs = dict(vars(opt), verbose=eval_opt.verbose, verbose_beam=eval_opt.verbose_beam,
                      seq_kd=eval_opt.seq_kd, seq_kd_path=eval_opt.seq_kd_path, dump_path=eval_opt.dump_path)
        crit = build_criterion(0) if eval_opt.verbose_loss else None
        loss, predictions, lang_stats, timing = eval_split(model, loader, kwargs, crit=crit, device=device)
    if loss is not None:
        print(f'loss: {loss:.4f}')
    # language_eval has printed each metric ("CIDEr: 1.234", as the reference) and SPICE's availability.
    print(f"decoding: {timing['ms_per_image']:.2f} ms per image at batch size {timing['batch_size']}, "
          f"beam size {timing['beam_size']} ({timing['images']} images, {device.type})")
    return opt, predictions, lang_stats, dict(timing, device=device.type)


def write_outputs(eval_opt, opt, predictions, lang_stats, timing):
    """vis/<id>.json, the timing json and the caption viewer, as the flags ask."""
    from misc.eval_utils import write_json_atomic
    if eval_opt.timing_json:
        write_json_atomic(timing, eval_opt.timing_json)
    if eval_opt.dump_json:
        path = os.path.join('vis', f'{opt.id}.json')
        write_json_atomic(predictions, path)
        print(f'wrote {len(predictions)} captions to {path}')
    if eval_opt.dump_images:
        from misc.visualize import write_index_html
        scores = os.path.join('eval_results', f'{opt.id}_{opt.split}.json') if lang_stats else None
        path = write_index_html(predictions, opt, lang_stats_path=scores, image_root=eval_opt.image_root)
        print(f'wrote the caption viewer to {path}')


def main(argv=None):
    from opts import parse_eval_opt
    eval_opt = parse_eval_opt(argv)
    try:
        opt, predictions, lang_stats, timing = run_evaluation(eval_opt)
        write_outputs(eval_opt, opt, predictions, lang_stats, timing)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
