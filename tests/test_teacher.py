"""misc/train/teacher.py and word-level distillation (--kd_weight, --teacher_model): the KL term against a teacher
checkpoint, the teacher's mode, its refusals, and train.py with a teacher end to end."""
import argparse
import json
import os

import pytest
import torch

import opts
from misc.run.checkpoint import write_checkpoint_files
from misc.options.configs import ModelConfig
from misc.run.infos import make_infos
from models.loading import load_model
from misc.errors import SaticError
from misc.files.atomic import save_pickle
from misc.files.safe_load import load_pickle, load_torch
from misc.train.loss_wrapper import LossConfig, LossWrapper
from misc.train.losses import LanguageModelCriterion
from misc.train.teacher import default_infos_path, load_teacher
from tests.helpers import assert_option_refused, REWARD_GTS as GTS, run_main, setup_model, targs


VOCAB = {str(i): f'w{i}' for i in range(1, 21)}  # 20 words, V = 21
FEAT = 12


def tiny_model_opt(**overrides):
    opt = dict(caption_model='sat', K=2, vocab_size=len(VOCAB), seq_length=16, input_encoding_size=32, rnn_size=48,
               num_layers=1, att_feat_size=FEAT, drop_prob_lm=0.5, use_bn=0)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def save_run(folder, run_id, vocab=VOCAB, best=False, seed=0, **overrides):
    """A checkpoint folder as train.py writes it: model.pth + infos_<id>.pkl (and the -best copies)."""
    opt = tiny_model_opt(**overrides)
    torch.manual_seed(seed)
    model = setup_model(opt) if opt.caption_model in ('sat', 'transformer') else setup_model(tiny_model_opt())
    infos = make_infos(vars(opt), ModelConfig.from_opt(opt), vocab, iteration=10, epoch=1)
    return write_checkpoint_files(folder, run_id, model.state_dict(), infos, best=best)


def kd_opt(teacher_model=None, **overrides):
    opt = dict(label_smoothing=0, seq_per_img=2, cached_tokens='unused', kd_weight=0.5, teacher_model=teacher_model,
               teacher_infos=None, teacher_caption_model='show_tell', teacher_eval_mode=0, input_json='cocotalk.json',
               att_feat_size=FEAT, encode_per_image=0)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def teacher_of(opt):
    """misc.train.teacher.load_teacher for the options of kd_opt (as train.py calls it)."""
    return load_teacher(opt.teacher_model, VOCAB, opt.att_feat_size, opt.teacher_infos, opt.teacher_caption_model,
                        bool(opt.teacher_eval_mode), opt.input_json, load_model=load_model)


def kd_batch(S=4, N=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(S, 18, dtype=torch.long)
    masks = torch.zeros(S, 18)
    for i, n in enumerate([3, 16, 1, 7][:S]):
        labels[i, 1:n + 1] = torch.randint(1, len(VOCAB) + 1, (n,), generator=g)
        masks[i, :n + 2] = 1
    att = torch.randn(S // 2, N, FEAT, generator=g).repeat_interleave(2, dim=0)  # 2 captions per image
    return {'fc_feats': torch.zeros(S, FEAT), 'att_feats': att, 'att_masks': None, 'labels': labels, 'masks': masks}


def kl_by_hand(student, teacher, masks):
    """sum over vocabulary of exp(t) * (t - s), over the rows of masks[:, 1:], / the number of those rows."""
    student, total, rows = student.detach(), 0.0, 0
    for i in range(student.size(0)):
        for t in range(student.size(1)):
            if masks[i, t + 1] > 0:
                total += float((teacher[i, t].exp() * (teacher[i, t] - student[i, t])).sum())
                rows += 1
    return total / rows


@pytest.fixture
def teacher_path(tmp_path):
    """A transformer teacher (K=1, other sizes than the student's K=2 student)."""
    return save_run(str(tmp_path / 'teacher'), 'teacher', caption_model='transformer', K=1, input_encoding_size=16,
                    rnn_size=24, seed=7)


def student():
    torch.manual_seed(1)
    model = setup_model(tiny_model_opt())
    model.eval()  # deterministic student: the only dropout left is the teacher's
    return model


def test_kd_loss_is_xe_plus_weighted_kl_teacher_eval_mode(teacher_path):
    opt = kd_opt(teacher_path, teacher_eval_mode=1)
    teacher = teacher_of(opt)
    wrapper = LossWrapper(student(), LossConfig.from_opt(opt), teacher=teacher)
    batch = kd_batch()
    out = wrapper(batch)
    assert not teacher.training
    s = wrapper.model(batch['fc_feats'], batch['att_feats'], batch['labels'], None)
    t = teacher(batch['fc_feats'], batch['att_feats'], batch['labels'], None)
    xe = float(LanguageModelCriterion()(s, batch['labels'][:, 1:], batch['masks'][:, 1:]).detach())
    kl = kl_by_hand(s, t, batch['masks'])
    assert kl > 0.01
    assert float(out['kd_loss']) == pytest.approx(kl, rel=1e-5)
    assert float(out['loss'].detach()) == pytest.approx(xe + 0.5 * kl, rel=1e-5)
    torch.manual_seed(123)
    assert float(wrapper(batch)['loss'].detach()) == pytest.approx(float(out['loss'].detach()), rel=1e-6)  # no dropout: the same
    # without a teacher (kd_weight 0) it is the XE alone
    assert float(LossWrapper(wrapper.model, LossConfig.from_opt(kd_opt(kd_weight=0)))(batch)['loss'].detach()) == pytest.approx(xe, rel=1e-6)


def test_teacher_runs_in_train_mode_by_default(teacher_path):
    """reference quirk: the teacher's dropout is on (--teacher_eval_mode 0)."""
    opt = kd_opt(teacher_path)
    teacher = teacher_of(opt)
    wrapper = LossWrapper(student(), LossConfig.from_opt(opt), teacher=teacher)
    batch = kd_batch()
    torch.manual_seed(5)
    first = wrapper(batch)
    assert teacher.training
    torch.manual_seed(6)
    second = wrapper(batch)
    assert abs(float(first['kd_loss']) - float(second['kd_loss'])) > 1e-4  # dropout: another draw, another KL
    torch.manual_seed(5)  # the same draw by hand: the teacher in train mode, on the same batch
    s = wrapper.model(batch['fc_feats'], batch['att_feats'], batch['labels'], None)
    with torch.no_grad():
        t = teacher(batch['fc_feats'], batch['att_feats'], batch['labels'], None)
    assert float(first['kd_loss']) == pytest.approx(kl_by_hand(s, t, batch['masks']), rel=1e-5)


def test_teacher_is_frozen_and_outside_the_student(teacher_path):
    opt = kd_opt(teacher_path)
    teacher = teacher_of(opt)
    model = student()
    model.train()
    wrapper = LossWrapper(model, LossConfig.from_opt(opt), teacher=teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in wrapper.parameters()}
    assert set(wrapper.state_dict()) == {f'model.{k}' for k in model.state_dict()}
    assert not any('teacher' in name for name, _ in wrapper.named_modules())
    wrapper(kd_batch())['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    wrapper.double()  # .to()/.cuda()/.double() of the wrapper move the teacher too
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


def test_kd_only_in_the_xe_stage(teacher_path, cached_tokens):
    opt = kd_opt(teacher_path, cached_tokens=cached_tokens)
    calls = []
    teacher = teacher_of(opt)
    teacher.register_forward_hook(lambda *a: calls.append(1))
    model = student()
    model.train()
    wrapper = LossWrapper(model, LossConfig.from_opt(opt), teacher=teacher)
    batch = dict(kd_batch(), gts=[GTS[0], GTS[1]], infos=None)
    out = wrapper(batch, sc_flag=True)
    assert 'kd_loss' not in out and not calls


def test_default_teacher_infos_path(tmp_path):
    folder = str(tmp_path / 'run')
    save_run(folder, 'sat-2', best=True)
    assert default_infos_path(os.path.join(folder, 'model.pth')) == os.path.join(folder, 'infos_sat-2.pkl')
    assert default_infos_path(os.path.join(folder, 'model-best.pth')) == os.path.join(folder, 'infos_sat-2-best.pkl')
    save_pickle({}, os.path.join(folder, 'infos_other.pkl'))
    with pytest.raises(SaticError, match=r'2 infos files .*pass --teacher_infos'):
        default_infos_path(os.path.join(folder, 'model.pth'))
    with pytest.raises(SaticError, match='no infos file .*pass --teacher_infos'):
        default_infos_path(str(tmp_path / 'model.pth'))


def one_line(error):
    text = str(error.value)
    assert '\n' not in text
    return text


def test_teacher_of_another_vocabulary_is_refused(tmp_path):
    other = dict(VOCAB, **{'20': 'zebra'})
    path = save_run(str(tmp_path / 'other'), 'other', vocab=other)
    with pytest.raises(SaticError) as error:
        teacher_of(kd_opt(path))
    assert path in one_line(error) and 'vocabulary' in one_line(error)


def test_show_tell_teacher_is_refused(tmp_path):
    path = save_run(str(tmp_path / 'st'), 'st', caption_model='show_tell')
    with pytest.raises(SaticError) as error:
        teacher_of(kd_opt(path))
    assert 'infos_st.pkl' in one_line(error) and "'show_tell'" in one_line(error)
    path = save_run(str(tmp_path / 'tr'), 'tr', caption_model='transformer', K=1)
    with pytest.raises(SaticError) as error:  # --teacher_caption_model, when given, must be the teacher's
        teacher_of(kd_opt(path, teacher_caption_model='sat'))
    assert 'infos_tr.pkl' in one_line(error)
    assert teacher_of(kd_opt(path, teacher_caption_model='transformer')).K == 1



def test_kd_without_teacher_model_is_refused():
    assert_option_refused(['--kd_weight', '0.5'], '--teacher_model', 'show_tell', 'does not exist in this project')
    assert_option_refused(['--kd_weight', '0.5', '--teacher_caption_model', 'topdown', '--teacher_model', 'x.pth'], 'topdown')
    assert_option_refused(['--kd_weight', '-1'], '--kd_weight')
    assert_option_refused(['--teacher_model', 'x.pth'], '--teacher_model', '--kd_weight > 0')
    assert_option_refused(['--teacher_eval_mode', '1'], '--teacher_eval_mode', '--kd_weight > 0')
    assert_option_refused(['--kd_weight', '1', '--teacher_model', 'x.pth', '--teacher_eval_mode', '2'], '--teacher_eval_mode')
    opt = opts.parse_opt(['--kd_weight', '0.5', '--teacher_model', 'x.pth', '--teacher_eval_mode', '1'])
    assert (opt.kd_weight, opt.teacher_model, opt.teacher_eval_mode) == (0.5, 'x.pth', 1)
    assert opts.parse_opt(['--teacher_caption_model', 'topdown']).kd_weight == 0  # inert without --kd_weight



def kd_train_args(ds, folder, run_id, *extra):
    """3 iterations of a tiny SAT K=2 student."""
    return targs(ds, folder, '--caption_model', 'sat', '--K', '2', '--init_from', 'none', '--rnn_size', '24',
                 '--max_iters', '3', '--save_checkpoint_every', '1000', *extra, run_id=run_id)


def test_train_with_kd_end_to_end(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tiny_dataset.input_json) as f:
        vocab = json.load(f)['ix_to_word']
    teacher = save_run(str(tmp_path / 'teacher'), 'teacher', vocab=vocab, caption_model='transformer', K=1,
                       att_feat_size=tiny_dataset.feat_dim, input_encoding_size=16, rnn_size=24, best=True)
    best = os.path.join(os.path.dirname(teacher), 'model-best.pth')
    runs = {}
    for name, extra in (('kd', ['--kd_weight', '0.5', '--teacher_model', best]),
                        ('kd-eval', ['--kd_weight', '0.5', '--teacher_model', teacher, '--teacher_eval_mode', '1']),
                        ('xe', [])):
        rc, out, err = run_main(kd_train_args(tiny_dataset, tmp_path / name, name, *extra))
        assert rc == 0, err
        runs[name] = load_torch(str(tmp_path / name / 'model.pth'))
        if name != 'xe':
            assert 'distillation: teacher' in out and ('eval mode' in out) == (name == 'kd-eval')
    student_model = setup_model(tiny_model_opt(vocab_size=len(vocab), att_feat_size=tiny_dataset.feat_dim,
                                                input_encoding_size=16, rnn_size=24))
    assert set(runs['kd']) == set(student_model.state_dict())  # the teacher is not saved with the student
    optimizer = load_torch(str(tmp_path / 'kd' / 'optimizer.pth'))
    assert sum(len(g['params']) for g in optimizer['param_groups']) == len(list(student_model.parameters()))
    infos = load_pickle(str(tmp_path / 'kd' / 'infos_kd.pkl'))
    assert infos['opt'].teacher_model == best and infos['iter'] == 3
    # the teacher in eval mode draws no random numbers: the only difference from plain XE is the KL gradient
    assert any(not torch.equal(runs['kd-eval'][k], runs['xe'][k]) for k in runs['xe'])

    # a teacher of another vocabulary: one line naming it, before training
    other = save_run(str(tmp_path / 'other'), 'other', vocab=dict(vocab, **{'1': 'zebra'}),
                     att_feat_size=tiny_dataset.feat_dim)
    rc, _, err = run_main(kd_train_args(tiny_dataset, tmp_path / 'bad', 'bad', '--kd_weight', '1',
                                          '--teacher_model', other))
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert rc == 2 and len(lines) == 1 and other in lines[0] and 'vocabulary' in lines[0], err
    assert not os.path.exists(tmp_path / 'bad' / 'model.pth')
