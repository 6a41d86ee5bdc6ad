"""The teacher of word-level distillation (--kd_weight w > 0, README "Options we added").

The reference loaded a show_tell/topdown teacher from hard-coded paths; those models do not exist here, so the
teacher is a checkpoint of this project (--teacher_model, 'sat' of any K or 'transformer') with its infos
(--teacher_infos, default: the infos pkl beside it). It is loaded through the safe loaders, frozen, and kept out of
the student's state_dict, optimiser, DDP parameters and checkpoints (misc.loss_wrapper holds it unregistered).
"""
import argparse
import glob
import os
import re

from misc.errors import SaticError


def default_infos_path(model_path):
    """The infos pkl saved with a checkpoint: DIR/model-best.pth -> DIR/infos_*-best.pkl, DIR/model-<tag>.pth ->
    DIR/infos_*-<tag>.pkl, DIR/model.pth -> DIR/infos_*.pkl (not -best, nor a history copy infos_*-<iter>.pkl that
    has its model-<iter>.pth). Exactly one must fit, else SaticError asking for --teacher_infos."""
    folder, name = os.path.split(model_path)
    found = sorted(glob.glob(os.path.join(glob.escape(folder or '.'), 'infos_*.pkl')))
    tagged = re.fullmatch(r'model-(.+)\.pth', name)
    if tagged:
        candidates = [p for p in found if p.endswith(f'-{tagged.group(1)}.pkl')]
    elif name == 'model.pth':
        def is_copy(path):
            m = re.search(r'-([^-]+)\.pkl$', os.path.basename(path))
            return bool(m) and (m.group(1) == 'best' or os.path.isfile(os.path.join(folder, f'model-{m.group(1)}.pth')))
        candidates = [p for p in found if not is_copy(p)]
    else:
        raise SaticError(f"--teacher_model {model_path}: not a model.pth / model-best.pth, so its infos file cannot be "
                         f"guessed; pass --teacher_infos PATH")
    if len(candidates) != 1:
        what = 'no infos file' if not candidates else f"{len(candidates)} infos files ({', '.join(map(os.path.basename, candidates))})"
        raise SaticError(f"--teacher_model {model_path}: {what} beside it fit; pass --teacher_infos PATH")
    return candidates[0]


def load_teacher(opt, vocab, device=None):
    """The frozen teacher model for opt (--teacher_model, --teacher_infos, --teacher_caption_model,
    --teacher_eval_mode), checked against the student's vocabulary and region feature size."""
    import models
    from misc.fileio import load_pickle, load_torch
    from opts import fill_defaults
    path = opt.teacher_model
    if not os.path.isfile(path):
        raise SaticError(f"--teacher_model {path}: file not found")
    infos_path = opt.teacher_infos or default_infos_path(path)
    infos = load_pickle(infos_path)
    if not isinstance(infos, dict) or not isinstance(infos.get('opt'), argparse.Namespace) \
            or not isinstance(infos.get('vocab'), dict):
        raise SaticError(f"teacher infos {infos_path} is not an infos file (a dict with opt and vocab): pass the "
                         f"infos_<id>.pkl saved with {path} as --teacher_infos")
    t_opt = fill_defaults(argparse.Namespace(**vars(infos['opt'])))
    caption_model = t_opt.caption_model
    if caption_model not in ('sat', 'transformer'):
        raise SaticError(f"teacher {infos_path}: caption_model {caption_model!r}; only this project's sat/transformer "
                         f"checkpoints can teach (the reference's show_tell/topdown teachers do not exist here)")
    wanted = opt.teacher_caption_model
    if wanted not in ('show_tell', caption_model):
        raise SaticError(f"--teacher_caption_model {wanted}, but the teacher {infos_path} is a {caption_model!r} model")
    if infos['vocab'] != vocab:
        raise SaticError(f"teacher {path} (infos {infos_path}) has another vocabulary ({len(infos['vocab'])} words) "
                         f"than {opt.input_json} ({len(vocab)} words): the teacher must be trained on the same "
                         f"cocotalk.json")
    if t_opt.att_feat_size != opt.att_feat_size:
        raise SaticError(f"teacher {path} (infos {infos_path}) takes {t_opt.att_feat_size}-d region features, the "
                         f"student {opt.att_feat_size}-d: the teacher must be trained on the same features")
    t_opt.vocab_size = len(infos['vocab'])
    teacher = models.setup(t_opt)
    models.load_weights(teacher, load_torch(path, 'teacher model'), path)
    teacher.requires_grad_(False)
    teacher.train(not opt.teacher_eval_mode)
    if device is not None:
        teacher.to(device)
    return teacher
