"""The teacher of word-level distillation (--kd_weight w > 0, README "Options we added").

The reference loaded a show_tell/topdown teacher from hard-coded paths; those models do not exist here, so the
teacher is a checkpoint of this project (--teacher_model, 'sat' of any K or 'transformer') with its infos
(--teacher_infos, default: the infos pkl beside it). It is loaded through the safe loaders, frozen, and kept out of
the student's state_dict, optimiser, DDP parameters and checkpoints (misc.train.loss_wrapper holds it unregistered).
"""
import os

from misc.run.checkpoint import default_infos_path
from misc.errors import SaticError
from misc.run.infos import model_config, read_infos

__all__ = ['default_infos_path', 'load_teacher']


def load_teacher(path, vocab, att_feat_size, infos_path=None, caption_model='show_tell', eval_mode=False,
                 input_json='the cocotalk.json', device=None, *, load_model):
    """The frozen teacher model of path (--teacher_model) and infos_path (--teacher_infos; default beside path),
    checked against the student's vocabulary (of input_json) and region feature size att_feat_size; caption_model
    (--teacher_caption_model): 'show_tell' (the reference's default: any) or the teacher's; eval_mode
    (--teacher_eval_mode): the teacher without dropout. load_model(model_path, config, vocab_size, what): the model
    builder (models.loading.load_model, injected: misc/ does not import models/)."""
    if not os.path.isfile(path):
        raise SaticError(f"--teacher_model {path}: file not found")
    infos_path = infos_path or default_infos_path(path)
    infos = read_infos(infos_path, name=f'teacher infos {infos_path}',
                       advice=f'pass the infos_<id>.pkl saved with {path} as --teacher_infos')
    config = model_config(infos)  # a reference-era infos lacks our options: their defaults
    wanted, caption_model = caption_model, config.caption_model
    if caption_model not in ('sat', 'transformer'):
        raise SaticError(f"teacher {infos_path}: caption_model {caption_model!r}; only this project's sat/transformer "
                         f"checkpoints can teach (the reference's show_tell/topdown teachers do not exist here)")
    if wanted not in ('show_tell', caption_model):
        raise SaticError(f"--teacher_caption_model {wanted}, but the teacher {infos_path} is a {caption_model!r} model")
    if infos['vocab'] != vocab:
        raise SaticError(f"teacher {path} (infos {infos_path}) has another vocabulary ({len(infos['vocab'])} words) "
                         f"than {input_json} ({len(vocab)} words): the teacher must be trained on the same "
                         f"cocotalk.json")
    if config.att_feat_size != att_feat_size:
        raise SaticError(f"teacher {path} (infos {infos_path}) takes {config.att_feat_size}-d region features, the "
                         f"student {att_feat_size}-d: the teacher must be trained on the same features")
    teacher = load_model(path, config, len(infos['vocab']), 'teacher model')
    teacher.requires_grad_(False)
    teacher.train(not eval_mode)
    if device is not None:
        teacher.to(device)
    return teacher
