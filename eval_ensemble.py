"""Evaluate an ensemble of captioners decoded as one (docs/ensembles.md).

  python eval_ensemble.py --ids nsc-transformer-a nsc-transformer-b --weights 1 1 --beam_size 3
  python eval_ensemble.py --models a/model-best.pth b/model.pth --infos_paths a/infos_a-best.pkl b/infos_b.pkl

--ids X (the reference's flag) means save/X/model-best.pth with save/X/infos_X-best.pkl; --models/--infos_paths
name checkpoints anywhere (both lists comma or space separated). At every decoding step the ensemble's word
log-probs are the log of the members' weighted mean probabilities (models.ensemble.EnsembleModel; --weights one per
model, default equal, normalised; finite and > 0). Members must share K, the vocabulary, the feature size and the
data files (--input_json, --input_att_dir: pass them to override every member's); each member sees the features as
it was trained (its own --norm_att_feat). Everything else is eval.py's: its
decoding and data options (the data paths default to the first model's infos), metrics, vis/<id>.json,
--dump_attention, --dump_images; --server_json 1 writes vis/<id>.json in the COCO server format instead
(eval_cocotest.py's), without references.
"""
import copy
import math
import os
import sys

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.options.configs import EnsembleOptions
from opts import OptionParser, add_cfg_option, add_eval_options, add_options, check_eval_split, parse_with_cfg


def build_parser():
    parser = OptionParser(description='Evaluate an ensemble of SATIC checkpoints (same K and vocabulary).')
    add_cfg_option(parser)
    add_eval_options(parser)
    add_options(parser, EnsembleOptions)
    # One model's --model/--infos_path do not apply; the output id defaults to the members' (the reference's).
    parser.set_defaults(model='', infos_path='', id='')
    return parser


def parse_args(argv=None):
    """The options, resolved here at the edge: --server_json 1 means no references (language_eval 0, no label
    file); --id defaults to the members' (default_id)."""
    eval_opt = parse_with_cfg(build_parser(), argv)
    eval_opt.id = eval_opt.id or default_id(eval_opt)
    if eval_opt.server_json:  # the COCO test images have no references
        eval_opt.language_eval, eval_opt.input_label_h5 = 0, 'none'
    return eval_opt


def split_list(values):
    """['a,b', 'c'] -> ['a', 'b', 'c']: comma or space separated."""
    return [item for value in values for item in value.split(',') if item]


def member_files(eval_opt):
    """[(model.pth, infos.pkl)] of --ids then --models/--infos_paths; SaticError (one line) when they do not pair."""
    if eval_opt.model or eval_opt.infos_path:
        raise SaticError('--model/--infos_path name one checkpoint: pass the ensemble as --ids or as '
                         '--models with --infos_paths')
    ids, paths, infos = split_list(eval_opt.ids), split_list(eval_opt.models), split_list(eval_opt.infos_paths)
    if len(paths) != len(infos):
        raise SaticError(f'{len(paths)} --models but {len(infos)} --infos_paths: give one infos file per model')
    files = [(os.path.join('save', i, 'model-best.pth'), os.path.join('save', i, f'infos_{i}-best.pkl')) for i in ids]
    files += list(zip(paths, infos))
    if not files:
        raise SaticError('no models: pass --ids (save/<id>/) or --models with --infos_paths')
    return files


def member_weights(eval_opt, count):
    """--weights as floats, one per model (default equal); SaticError (one line) otherwise."""
    texts = split_list(eval_opt.weights)
    if not texts:
        return [1.0] * count
    try:
        weights = [float(w) for w in texts]
    except ValueError:
        raise SaticError(f"--weights {' '.join(texts)}: not numbers") from None
    if len(weights) != count:
        raise SaticError(f'{len(weights)} --weights for {count} models: give one weight per model')
    bad = [t for t, w in zip(texts, weights) if not (math.isfinite(w) and w > 0)]
    if bad:
        raise SaticError(f"--weights {' '.join(texts)}: {bad[0]} is not a finite number > 0; give each model a "
                         "positive weight (they are normalised to sum to 1)")
    return weights


def check_compatible(first, other):
    """Members (path, model, opt, infos) that cannot be averaged word by word: one line naming both files."""
    (path_a, model_a, opt_a, infos_a), (path_b, model_b, opt_b, infos_b) = first, other
    if model_a.K != model_b.K:
        raise SaticError(f'{path_a} decodes K={model_a.K} words per step but {path_b} K={model_b.K}: an ensemble '
                         'averages the same positions at each step, so its models need the same K')
    if infos_a['vocab'] != infos_b['vocab']:
        raise SaticError(f'{path_a} and {path_b} have different vocabularies ({len(infos_a["vocab"])} and '
                         f'{len(infos_b["vocab"])} words, or other word ids): an ensemble averages word by word, '
                         'so its models need the same vocabulary (the same cocotalk.json)')
    if opt_a.att_feat_size != opt_b.att_feat_size:
        raise SaticError(f'{path_a} reads {opt_a.att_feat_size}-d region features but {path_b} '
                         f'{opt_b.att_feat_size}-d: the models of an ensemble read the same features')
    for flag in DATA_FLAGS:  # one loader reads the data of every member
        a, b = getattr(opt_a, flag, None), getattr(opt_b, flag, None)
        if a != b and os.path.realpath(str(a)) != os.path.realpath(str(b)):
            raise SaticError(f'{path_a} reads --{flag} {a} but {path_b} --{flag} {b}: an ensemble decodes one '
                             f'set of data; pass --{flag} PATH for all of them (the same features and images)')


# The data every member must read the same: one DataLoader feeds them all (norm_att_feat is per member).
DATA_FLAGS = ('input_json', 'input_att_dir')


def data_options(members):
    """(the loader's options, per-member normalise flags or None): with members of different --norm_att_feat, the
    loader reads the features un-normalised and the members trained with --norm_att_feat 1 normalise them
    (EnsembleModel's normalise); otherwise the first member's options as they are."""
    opts = [opt for _, _, opt, _ in members]
    norms = [bool(getattr(opt, 'norm_att_feat', 0)) for opt in opts]
    if len(set(norms)) == 1:
        return opts[0], None
    loader_opt = copy.copy(opts[0])
    loader_opt.norm_att_feat = 0
    return loader_opt, norms


def load_ensemble(eval_opt, files):
    """(EnsembleModel, the first model's resolved options, its infos) for eval.run_evaluation's `loaded`; files
    [(model.pth, infos.pkl)] (member_files)."""
    from evaluator import load_checkpoint  # (evaluator and models import torch: --help stays light)
    from models.ensemble import EnsembleModel  # (as evaluator)
    weights = member_weights(eval_opt, len(files))
    members = []
    for model_path, infos_path in files:
        members.append((model_path,) + load_checkpoint(eval_opt, model_path, infos_path))
        check_compatible(members[0], members[-1])
    opt, normalise = data_options(members)
    ensemble = EnsembleModel([model for _, model, _, _ in members], weights, normalise).eval()
    print(f"ensemble of {len(members)} models (K={ensemble.K}), weights "
          f"{', '.join(f'{w:.3g}' for w in ensemble.weights)}: {', '.join(path for path, *_ in members)}")
    return ensemble, opt, members[0][3]


def default_id(eval_opt):
    """The reference's output id: each model's name followed by its weight, joined by '+'."""
    names = split_list(eval_opt.ids) + [os.path.basename(os.path.dirname(os.path.abspath(p))) or p
                                        for p in split_list(eval_opt.models)]
    weights = split_list(eval_opt.weights) or ['1'] * len(names)
    return '+'.join(f'{name}{weight}' for name, weight in zip(names, weights))


def run(eval_opt):
    """The ensemble's evaluation through evaluator's functions, with arguments (the parsed options stay as parsed)."""
    from evaluator import (check_attention_options, check_outputs, output_folders, run_evaluation,  # (torch)
                           write_outputs, write_server_results)
    check_eval_split(eval_opt)
    check_attention_options(eval_opt)
    files = member_files(eval_opt)
    if eval_opt.image_folder:  # own images (eval.py --image_folder), decoded by the ensemble
        from captioner import caption_folder, image_output_folders, write_image_outputs
        check_outputs(image_output_folders(eval_opt))
        write_image_outputs(eval_opt, *caption_folder(eval_opt, loaded=load_ensemble(eval_opt, files)))
        return
    check_outputs(output_folders(eval_opt) + [('vis', 'vis/ (--server_json 1)')] * bool(eval_opt.server_json))
    loaded = load_ensemble(eval_opt, files)
    opt, result, lang_stats, img_to_eval = run_evaluation(eval_opt, loaded=loaded,
                                                          model_name=' + '.join(path for path, _ in files))
    # with --server_json 1, vis/<id>.json is the server file
    write_outputs(eval_opt, opt, result, lang_stats, img_to_eval, dump_json=False if eval_opt.server_json else None)
    if eval_opt.server_json:
        write_server_results(result.predictions, eval_opt.id)


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
