"""Evaluating a checkpoint on a split, as functions of eval.py's parsed options: shared by eval.py,
eval_cocotest.py, eval_ensemble.py and the Captioner API (captioner.py), which never import each other.

The application layer: above models/, misc/ and dataloader.py (which take configs and explicit arguments), below
the entry scripts; like opts.py it reads the parsed options (eval_opt, and opt: the checkpoint's options resolved
with eval.py's, opts.resolve_eval_options).
  load_checkpoint(eval_opt[, model_path, infos_path]) -> (model, opt, infos)
  run_evaluation(eval_opt[, loaded, model_name]) -> (opt, EvalResult, lang_stats, img_to_eval)
  write_outputs(eval_opt, opt, result, lang_stats, img_to_eval[, dump_json]); write_server_results (COCO server)
"""
import os

import torch

from dataloader import DataConfig, DataLoader, attach_boxes
from misc.run.checkpoint import default_infos_path
from misc.eval.coco_eval import check_ready, language_eval
from misc.errors import SaticError
from misc.eval.evaluation import evaluate
from misc.files.atomic import write_json
from misc.files.folders import check_output_folder
from misc.run.infos import loaded_line
from misc.train.losses import build_criterion
from misc.utils import resolve_device
from misc.viewer.visualize import write_index_html
from models.accel.bf16 import decode_bf16
from models.accel.speed import apply_eval_options, int8_kernel, use_cuda_graphs
from models.loading import load_for_eval
from opts import REFERENCE_EVAL_INFOS, REFERENCE_EVAL_MODEL, decode_config, resolve_eval_options


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


def infos_path_of(model_path, infos_path):
    """--infos_path, else (not given, or left at the reference's default while --model names another checkpoint)
    the infos file saved beside --model (misc.run.checkpoint.default_infos_path)."""
    if infos_path and (infos_path != REFERENCE_EVAL_INFOS or model_path == REFERENCE_EVAL_MODEL):
        return infos_path
    if not os.path.isfile(model_path):
        raise SaticError(f'--model {model_path}: file not found; pass a model.pth / model-best.pth of a run '
                         '(save/<id>/)')
    return default_infos_path(model_path, flag='--model', hint='pass --infos_path PATH')


def load_checkpoint(eval_opt, model_path=None, infos_path=None):
    """(model in eval mode on its device, resolved options, infos) of model_path and infos_path (default: --model
    and --infos_path; infos_path_of), checked to agree: the one way eval.py, eval_ensemble.py (one call per member)
    and the Captioner API load a run."""
    model_path = model_path or eval_opt.model
    infos_path = infos_path_of(model_path,
                               infos_path or (eval_opt.infos_path if model_path == eval_opt.model else ''))
    model, opt, infos = load_for_eval(model_path, infos_path,
                                      lambda infos: resolve_eval_options(eval_opt, infos, infos_path, model_path))
    print(loaded_line(infos, model_path), flush=True)
    device = resolve_device(opt.device)
    model = model.to(device).eval()
    use_cuda_graphs(model, opt.cuda_graphs)  # (ours, off by default; a GPU only)
    if opt.quantize or opt.compile:
        model = apply_eval_options(model, opt.quantize, bool(opt.compile))  # (both off by default)
        if opt.quantize == 'int8':
            print(int8_kernel(), flush=True)  # which int8 path this CPU gets (docs/speed.md, "Speed options")
    return model, opt, infos


def run_evaluation(eval_opt, loaded=None, model_name=None):
    """Load the checkpoint, decode the split, score it; returns (opt, EvalResult, lang_stats, img_to_eval).

    loaded: (model, resolved options, infos) already loaded (eval_ensemble.py: an EnsembleModel), else
    load_checkpoint(eval_opt); model_name: what messages call the model (default --model). Everything that can be
    checked before decoding is (checkpoint vs infos, Java and references, feature size).
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
        loader.check_att_feat_size(opt.att_feat_size,
                                   f'the checkpoint {model_name or eval_opt.model} (att_feat_size)')
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


def write_outputs(eval_opt, opt, result, lang_stats, img_to_eval, dump_json=None):
    """vis/<id>.json, eval_results/<id>_<split>.json, the seq-KD beams, the timing json and the caption viewer, as
    the flags ask; dump_json: whether to write vis/<id>.json (default --dump_json)."""
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
    if eval_opt.dump_json if dump_json is None else dump_json:
        path = os.path.join('vis', f'{opt.id}.json')
        write_json(result.predictions, path)
        print(f'wrote {len(result.predictions)} captions to {path}')
    if eval_opt.dump_images:
        scores = os.path.join('eval_results', f'{opt.id}_{opt.split}.json') if lang_stats else None
        path = write_index_html(result.predictions, opt.id, opt.split, opt.beam_size, opt.ref_json, opt.input_json,
                                lang_stats_path=scores, image_root=eval_opt.image_root)
        print(f'wrote the caption viewer to {path}')


def server_results(predictions):
    """The COCO server format: each image once (its first caption), with an integer id."""
    results, seen = [], set()
    for p in predictions:
        image_id = int(p['image_id'])
        if image_id not in seen:
            seen.add(image_id)
            results.append({'image_id': image_id, 'caption': p['caption']})
    return results


def write_server_results(predictions, run_id):
    """vis/<run_id>.json in the COCO server format (server_results); also eval_ensemble.py --server_json 1."""
    results = server_results(predictions)
    path = os.path.join('vis', f'{run_id}.json')
    write_json(results, path)
    print(f'wrote {len(results)} captions to {path} (COCO server format)')
