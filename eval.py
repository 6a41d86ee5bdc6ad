"""Evaluate a trained captioner on a split: captions, COCO metrics and decoding latency (README, "Using it on COCO").

  python eval.py --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl --batch_size 1 --beam_size 1

Options not on the command line come from the checkpoint's infos; the vocabulary always does. Writes (relative to
the working directory, as the reference) vis/<id>.json ([{image_id, caption}]), with --language_eval 1
eval_results/<id>_<split>.json, with --seq_kd 1 every image's beams (vis/<id>_seq_kd.json), with --dump_images 1
the caption viewer vis/index.html.
"""
import os
import sys

import torch

from dataloader import DataConfig, DataLoader
from misc.checkpoint import load_for_eval
from misc.coco_eval import check_ready, language_eval
from misc.errors import SaticError
from misc.evaluation import attach_boxes, evaluate
from misc.fileio import check_output_folder, run_cli, write_json
from misc.losses import build_criterion
from misc.utils import resolve_device
from misc.visualize import write_index_html
from models.accel.bf16 import decode_bf16
from models.accel.speed import apply_eval_options, int8_kernel, use_cuda_graphs
from opts import check_eval_split, decode_config, parse_eval_opt, resolve_eval_options


def output_folders(eval_opt):
    """[(folder, what writes there)] of the files this evaluation will write (see write_outputs)."""
    folders = []
    if eval_opt.language_eval:
        folders.append(('eval_results', 'eval_results/ (--language_eval 1)'))
    if eval_opt.seq_kd:
        folders.append((os.path.dirname(eval_opt.seq_kd_path) if eval_opt.seq_kd_path else 'vis',
                        f'--seq_kd_path {eval_opt.seq_kd_path}' if eval_opt.seq_kd_path else 'vis/ (--seq_kd 1)'))
    if eval_opt.timing_json:
        folders.append((os.path.dirname(eval_opt.timing_json), f'--timing_json {eval_opt.timing_json}'))
    if eval_opt.dump_json:
        folders.append(('vis', 'vis/ (--dump_json 1)'))
    if eval_opt.dump_images:
        folders.append(('vis', 'vis/ (--dump_images 1)'))
        if eval_opt.image_root:
            folders.append((os.path.join('vis', 'imgs'), 'vis/imgs/ (--dump_images 1 --image_root)'))
    return folders


def check_attention_options(eval_opt):
    """--dump_attention N writes into vis/<id>.json: N >= 0, --dump_json 1, and the boxes folder exists (before
    anything is decoded)."""
    if eval_opt.dump_attention < 0:
        raise SaticError(f'--dump_attention must be >= 0 (regions kept per word; got {eval_opt.dump_attention})')
    if eval_opt.dump_attention and not eval_opt.dump_json:
        raise SaticError('--dump_attention writes into vis/<id>.json: add --dump_json 1 (or drop --dump_attention)')
    if eval_opt.dump_attention and eval_opt.input_box_dir and not os.path.exists(eval_opt.input_box_dir):
        raise SaticError(f'--input_box_dir {eval_opt.input_box_dir} does not exist: the boxes of --dump_attention '
                         "are make_bu_data.py's _box output (or drop --input_box_dir)")


def check_outputs(folders):
    """Every output folder writable or creatable before anything is loaded or decoded (not
    after scoring the whole split)."""
    for folder, what in folders:
        check_output_folder(folder, what)


def load_checkpoint(eval_opt):
    """(model in eval mode on its device, resolved options, infos) of --model and --infos_path, checked to agree."""
    model, opt, infos = load_for_eval(eval_opt.model, eval_opt.infos_path,
                                      lambda infos: resolve_eval_options(eval_opt, infos, eval_opt.infos_path))
    device = resolve_device(opt.device)
    model = model.to(device).eval()
    use_cuda_graphs(model, opt.cuda_graphs)  # (ours, off by default; a GPU only)
    if opt.quantize or opt.compile:
        model = apply_eval_options(model, opt)  # --quantize int8, --compile 1 (both off by default)
        if opt.quantize == 'int8':
            print(int8_kernel(), flush=True)  # which int8 path this CPU gets (README, "Speed options")
    return model, opt, infos


def run_evaluation(eval_opt, loaded=None):
    """Load the checkpoint, decode the split, score it; returns (opt, EvalResult, lang_stats, img_to_eval).

    loaded: (model, resolved options, infos) already loaded (eval_ensemble.py: an EnsembleModel), else
    load_checkpoint(eval_opt). Everything that can be checked before decoding is (checkpoint vs infos, Java and
    references, feature size).
    """
    torch.manual_seed(eval_opt.seed)
    model, opt, infos = loaded or load_checkpoint(eval_opt)
    config = decode_config(opt, opt.vocab_size)  # bad decoding options fail here, before the data is loaded
    if opt.language_eval:
        check_ready(opt.ref_json)
    # --bf16 1, or by itself on a CPU with AMX (models.accel.bf16; not with --quantize int8)
    bf16 = opt.bf16 if opt.quantize == 'int8' else decode_bf16(opt.bf16, next(model.parameters()).device)
    if bf16 and not opt.bf16:
        print('decoding in bfloat16: this CPU has AMX (SATIC_BF16=0 keeps fp32; docs/speed.md)', flush=True)
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        loader.check_att_feat_size(opt.att_feat_size, f'the checkpoint {eval_opt.model} (att_feat_size)')
        loader.ix_to_word = infos['vocab']  # the vocabulary always comes from the checkpoint
        result = evaluate(model, loader, opt.split, config, num_images=opt.num_images,
                          batch_size=opt.batch_size, remove_bad_endings=bool(opt.remove_bad_endings),
                          crit=build_criterion(0) if eval_opt.verbose_loss else None, bf16=bf16,
                          keep_beams=eval_opt.seq_kd, with_paths=bool(eval_opt.dump_path),
                          verbose=bool(eval_opt.verbose), verbose_beam=bool(eval_opt.verbose_beam),
                          attention_top=eval_opt.dump_attention)
    if eval_opt.dump_attention and eval_opt.input_box_dir:
        attach_boxes(result.predictions, eval_opt.input_box_dir, opt.input_json)
    if result.loss is not None:
        print(f'loss: {result.loss:.4f}')
    lang_stats = img_to_eval = None
    if opt.language_eval:  # prints each metric ("CIDEr: 1.234", as the reference) and SPICE's availability
        lang_stats, img_to_eval = language_eval(result.predictions, opt.ref_json, split_name=opt.split,
                                                toolkit_verbose=bool(eval_opt.verbose))
    timing = result.timing
    timing['device'] = next(model.parameters()).device.type
    print(f"decoding: {timing['ms_per_image']:.2f} ms per image at batch size {timing['batch_size']}, "
          f"beam size {timing['beam_size']} ({timing['images']} images, {timing['device']})")
    return opt, result, lang_stats, img_to_eval


def write_outputs(eval_opt, opt, result, lang_stats, img_to_eval):
    """vis/<id>.json, eval_results/<id>_<split>.json, the seq-KD beams, the timing json and the caption viewer, as
    the flags ask."""
    if lang_stats is not None:
        path = os.path.join('eval_results', f'{opt.id}_{opt.split}.json')
        write_json({'overall': lang_stats, 'imgToEval': img_to_eval}, path)
    if eval_opt.seq_kd:
        path = eval_opt.seq_kd_path or os.path.join('vis', f'{opt.id}_seq_kd.json')
        write_json([{'image_id': p['image_id'], 'caption': beams}
                    for p, beams in zip(result.predictions, result.beams)], path)
        print(f'wrote the beam lists of {len(result.predictions)} images to {path}')
    if eval_opt.timing_json:
        write_json(result.timing, eval_opt.timing_json)
    if eval_opt.dump_json:
        path = os.path.join('vis', f'{opt.id}.json')
        write_json(result.predictions, path)
        print(f'wrote {len(result.predictions)} captions to {path}')
    if eval_opt.dump_images:
        scores = os.path.join('eval_results', f'{opt.id}_{opt.split}.json') if lang_stats else None
        path = write_index_html(result.predictions, opt, lang_stats_path=scores, image_root=eval_opt.image_root)
        print(f'wrote the caption viewer to {path}')


def main(argv=None):
    def run(eval_opt):
        check_eval_split(eval_opt)
        check_attention_options(eval_opt)
        check_outputs(output_folders(eval_opt))
        write_outputs(eval_opt, *run_evaluation(eval_opt))
    return run_cli(parse_eval_opt, run, argv)


if __name__ == '__main__':
    sys.exit(main())
