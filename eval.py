"""Evaluate a trained captioner on a split: captions, COCO metrics and decoding latency (SPEC.md section 5).

  python eval.py --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl --batch_size 1 --beam_size 1

Writes vis/<id>.json ([{image_id, caption}]) and, with --language_eval 1, eval_results/<id>_<split>.json.
"""
import os
import sys

import torch

from misc.errors import SaticError


def evaluate(eval_opt, default_language_eval=True):
    """Run one evaluation from parsed eval options; returns (predictions, lang_stats, timing)."""
    from dataloader import DataLoader
    from misc.eval_utils import eval_split, load_model_for_eval, write_json_atomic
    from misc.losses import build_criterion

    torch.manual_seed(eval_opt.seed)
    model, opt, infos, device = load_model_for_eval(eval_opt)
    if opt.language_eval:
        from misc.eval_utils import check_language_eval_ready
        check_language_eval_ready(opt.ref_json)
    loader = DataLoader(opt)
    loader.ix_to_word = infos['vocab']  # the vocabulary always comes from the checkpoint
    kwargs = dict(vars(opt))
    kwargs.update(verbose=eval_opt.verbose, verbose_beam=eval_opt.verbose_beam, seq_kd=eval_opt.seq_kd,
                  seq_kd_path=eval_opt.seq_kd_path, dump_path=eval_opt.dump_path)
    crit = build_criterion(0) if eval_opt.verbose_loss else None
    try:
        loss, predictions, lang_stats, timing = eval_split(model, loader, kwargs, crit=crit, device=device)
    finally:
        loader.close()
    if loss is not None:
        print(f'loss: {loss:.4f}')
    if lang_stats:
        for metric, score in lang_stats.items():
            print(f'{metric}: {score:.4f}' if isinstance(score, float) else f'{metric}: {score}')
    print(f"decoding: {timing['ms_per_image']:.2f} ms per image at batch size {timing['batch_size']}, "
          f"beam size {timing['beam_size']} ({timing['images']} images, {device.type})")
    if eval_opt.timing_json:
        os.makedirs(os.path.dirname(eval_opt.timing_json) or '.', exist_ok=True)
        write_json_atomic(dict(timing, device=device.type), eval_opt.timing_json)
    if eval_opt.dump_json:
        path = os.path.join('vis', f'{opt.id}.json')
        os.makedirs('vis', exist_ok=True)
        write_json_atomic(predictions, path)
        print(f'wrote {len(predictions)} captions to {path}')
    if eval_opt.dump_images:
        from misc.visualize import write_index_html
        path = write_index_html(predictions, opt, lang_stats_path=os.path.join('eval_results', f'{opt.id}_{opt.split}.json'),
                                image_root=eval_opt.image_root)
        print(f'wrote the caption viewer to {path}')
    return predictions, lang_stats, timing


def main(argv=None):
    from opts import parse_eval_opt
    eval_opt = parse_eval_opt(argv)
    try:
        evaluate(eval_opt)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
