"""Evaluate a trained captioner on a split: captions, COCO metrics and decoding latency (README, "Using it on COCO").

  python eval.py --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl --batch_size 1 --beam_size 1
  python eval.py --model save/X/model-best.pth --image_folder my_pictures   (own images: docs/own_images.md)

Options not on the command line come from the checkpoint's infos; the vocabulary always does. Without
--infos_path, the infos saved beside --model are used (infos_X-best.pkl for model-best.pth), and --id and
--ref_json default to the run's own. Writes (relative to
the working directory, as the reference) vis/<id>.json ([{image_id, caption}]), with --language_eval 1
eval_results/<id>_<split>.json, with --seq_kd 1 every image's beams (vis/<id>_seq_kd.json), with --dump_images 1
the caption viewer vis/index.html. With --image_folder: no split and no metrics; vis/<id>.json
([{image_id, caption, file_path}]) and with --dump_images 1 vis/index.html with the pictures (caption_folder).
"""
import os
import sys

import torch

from dataloader import DataConfig, DataLoader
from misc.checkpoint import default_infos_path, load_for_eval
from misc.coco_eval import check_ready, language_eval
from misc.errors import SaticError
from misc.evaluation import attach_boxes, evaluate
from misc.fileio import check_output_folder, run_cli, write_json
from misc.losses import build_criterion
from misc.utils import resolve_device
from misc.visualize import write_index_html
from models.accel.bf16 import decode_bf16
from models.accel.speed import apply_eval_options, int8_kernel, use_cuda_graphs
from opts import (REFERENCE_EVAL_INFOS, REFERENCE_EVAL_MODEL, check_eval_split, check_image_options, decode_config,
                  parse_eval_opt, resolve_eval_options)


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


def infos_path_of(eval_opt):
    """--infos_path, else (not given, or left at the reference's default while --model names another checkpoint)
    the infos file saved beside --model (misc.checkpoint.default_infos_path)."""
    if eval_opt.infos_path and (eval_opt.infos_path != REFERENCE_EVAL_INFOS or eval_opt.model == REFERENCE_EVAL_MODEL):
        return eval_opt.infos_path
    if not os.path.isfile(eval_opt.model):
        raise SaticError(f'--model {eval_opt.model}: file not found; pass a model.pth / model-best.pth of a run '
                         '(save/<id>/)')
    return default_infos_path(eval_opt.model, flag='--model', hint='pass --infos_path PATH')


def load_checkpoint(eval_opt):
    """(model in eval mode on its device, resolved options, infos) of --model and --infos_path (infos_path_of),
    checked to agree: the one way eval.py, eval_ensemble.py and the Captioner API load a run."""
    infos_path = infos_path_of(eval_opt)
    model, opt, infos = load_for_eval(eval_opt.model, infos_path,
                                      lambda infos: resolve_eval_options(eval_opt, infos, infos_path))
    device = resolve_device(opt.device)
    model = model.to(device).eval()
    use_cuda_graphs(model, opt.cuda_graphs)  # (ours, off by default; a GPU only)
    if opt.quantize or opt.compile:
        model = apply_eval_options(model, opt.quantize, bool(opt.compile))  # (both off by default)
        if opt.quantize == 'int8':
            print(int8_kernel(), flush=True)  # which int8 path this CPU gets (README, "Speed options")
    return model, opt, infos


def run_evaluation(eval_opt, loaded=None):
    """Load the checkpoint, decode the split, score it; returns (opt, EvalResult, lang_stats, img_to_eval).

    loaded: (model, resolved options, infos) already loaded (eval_ensemble.py: an EnsembleModel), else
    load_checkpoint(eval_opt). Everything that can be checked before decoding is (checkpoint vs infos, Java and
    references, feature size).
    """
    if eval_opt.image_folder:
        raise SaticError('--image_folder captions image files: use eval.py (or eval_ensemble.py) --image_folder, '
                         'not this script')
    torch.manual_seed(eval_opt.seed)
    model, opt, infos = loaded or load_checkpoint(eval_opt)
    config = decode_config(opt, opt.vocab_size)  # bad decoding options fail here, before the data is loaded
    if opt.language_eval:
        check_ready(opt.ref_json, opt.spice)
    # --bf16 1, or SATIC_BF16=auto on a CPU with AMX (models.accel.bf16; not with --quantize int8)
    bf16 = opt.bf16 if opt.quantize == 'int8' else decode_bf16(opt.bf16, next(model.parameters()).device)
    if bf16 and not opt.bf16:
        print('decoding in bfloat16: SATIC_BF16=auto and this CPU has AMX (docs/speed.md)', flush=True)
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        loader.check_att_feat_size(opt.att_feat_size, f'the checkpoint {eval_opt.model} (att_feat_size)')
        loader.ix_to_word = infos['vocab']  # the vocabulary always comes from the checkpoint
        result = evaluate(model, loader, opt.split, config, num_images=opt.num_images,
                          batch_size=opt.batch_size, remove_bad_endings=bool(opt.remove_bad_endings),
                          crit=build_criterion(0) if eval_opt.verbose_loss else None, bf16=bf16,
                          keep_beams=eval_opt.seq_kd, with_paths=bool(eval_opt.dump_path),
                          verbose=bool(eval_opt.verbose), verbose_beam=bool(eval_opt.verbose_beam),
                          attention_top=eval_opt.dump_attention, progress=f'decoding {opt.split}')
    if eval_opt.dump_attention and eval_opt.input_box_dir:
        attach_boxes(result.predictions, eval_opt.input_box_dir, opt.input_json)
    if result.loss is not None:
        print(f'loss: {result.loss:.4f}')
    lang_stats = img_to_eval = None
    if opt.language_eval:  # prints each metric ("CIDEr: 1.234", as the reference) and SPICE's availability
        lang_stats, img_to_eval = language_eval(result.predictions, opt.ref_json, split_name=opt.split,
                                                spice=opt.spice, toolkit_verbose=bool(eval_opt.verbose))
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
        path = write_index_html(result.predictions, opt.id, opt.split, opt.beam_size, opt.ref_json, opt.input_json,
                                lang_stats_path=scores, image_root=eval_opt.image_root)
        print(f'wrote the caption viewer to {path}')


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
    from captioner import Captioner
    entries = image_entries(eval_opt)
    torch.manual_seed(eval_opt.seed)
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


def main(argv=None):
    def run(eval_opt):
        check_image_options(eval_opt)
        if eval_opt.image_folder:  # own images: no split, no references, no metrics
            check_outputs(image_output_folders(eval_opt))
            write_image_outputs(eval_opt, *caption_folder(eval_opt))
            return
        check_eval_split(eval_opt)
        check_attention_options(eval_opt)
        check_outputs(output_folders(eval_opt))
        write_outputs(eval_opt, *run_evaluation(eval_opt))
    return run_cli(parse_eval_opt, run, argv)


if __name__ == '__main__':
    sys.exit(main())
