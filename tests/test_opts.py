"""opts.py: the reference's training and model options exist with their defaults, are accepted and inert or refused
in one line, and the README's train.py commands parse."""
import argparse
import csv
import os
import re
import shlex

import pytest
import torch

import opts
from misc.errors import SaticError
from tests.helpers import assert_option_refused, needs_shared, REPO_ROOT, setup_model, shared_path

REFERENCE_OPTIONS = shared_path('conformance', 'reference_options.tsv')


def reference_options():
    with open(REFERENCE_OPTIONS) as f:
        rows = [line for line in f if not line.startswith('#')]
    return list(csv.DictReader(rows, delimiter='\t'))


@needs_shared('conformance', 'reference_options.tsv')
def test_every_reference_option_exists_with_its_default():
    defaults = vars(opts.parse_opt([]))
    for row in reference_options():
        name = row['option'].lstrip('-')
        assert name in defaults, name
        default = row['default']
        if row['type'] in ('str',) and default != 'None':
            assert defaults[name] == default.strip("'"), name
        elif row['type'] in ('int', 'float'):
            assert defaults[name] == float(default), name


def test_refused_reference_options_say_why_in_one_line():
    assert_option_refused(['--use_box', '1'], '--use_box 1', 'box')
    with pytest.raises(SaticError) as error:  # also for a checkpoint's infos (eval.py)
        opts.check_opt(argparse.Namespace(**dict(vars(opts.parse_opt([])), use_box=1)))
    assert '\n' not in str(error.value)


def test_inert_reference_options_are_accepted_and_change_nothing():
    argv = ['--rnn_type', 'gru', '--att_hid_size', '7', '--logit_layers', '3', '--fc_feat_size', '5',
            '--norm_box_feat', '1', '--input_box_dir', 'nowhere', '--scheduled_sampling_start', '0',
            '--scheduled_sampling_increase_every', '1', '--scheduled_sampling_increase_prob', '0.5',
            '--scheduled_sampling_max_prob', '0.9', '--nsc', '0', '--teacher_caption_model', 'topdown',
            '--noamopt', '--learning_rate_decay_start', '0', '--optim', 'sgd', '--weight_decay', '0.1']
    opt = opts.parse_opt(argv)
    plain = opts.parse_opt([])
    for o in (opt, plain):
        o.vocab_size = 20
    torch.manual_seed(0)
    a = setup_model(opt).state_dict()
    torch.manual_seed(0)
    b = setup_model(plain).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from misc.train import optim
    from misc.options.configs import OptimConfig
    noam = optim.build(setup_model(opt), OptimConfig.from_opt(opt), opt.input_encoding_size)  # --optim/--weight_decay are inert with --noamopt, as the reference
    assert isinstance(noam, optim.NoamOpt)


def readme_train_commands():
    """The original README's train.py command lines (its two SAT stages), as printed there."""
    with open(shared_path('seed', 'original_README.md')) as f:
        text = f.read()
    return [shlex.split(m.group(1)) for m in re.finditer(r'^python3?\s+train\.py\s+(.+)$', text, re.M)]


@needs_shared('seed', 'original_README.md')
def test_readme_train_commands_are_accepted():
    commands = readme_train_commands()
    assert len(commands) >= 2
    stage1 = next(c for c in commands if '--noamopt' in c)
    assert {'--scheduled_sampling_start', '--learning_rate_decay_start'} <= set(stage1)
    for argv in commands:
        opt = opts.parse_opt(argv)
        assert opt.K == 2
    assert opts.parse_opt(stage1).scheduled_sampling_start == 0


def _reference_rows(name):
    with open(shared_path('conformance', name)) as f:
        return list(csv.DictReader([line for line in f if not line.startswith('#')], delimiter='\t'))


def _assert_same_option(parser, row):
    """The reference's option row (option, type, default) is parser's option with that type and default."""
    name = row['option'].lstrip('-')
    action = next((a for a in parser._actions if a.dest == name), None)
    assert action is not None, name
    default, kind = row['default'].strip(), row['type']
    if kind == 'bool':
        assert action.default is (default == 'True') and action.type is opts.str2bool, name
    elif default == 'None':
        assert action.default is None, name
    elif kind == 'str':
        assert action.type is str and action.default == default.strip("'"), name
    elif action.const is True:  # store_true: the reference's action='store_true' flags
        assert action.default is False, name
    else:
        assert action.type is {'int': int, 'float': float}[kind] and action.default == float(default), name
        assert type(action.default) is {'int': int, 'float': float}[kind] or kind == 'float', name


@needs_shared('conformance', 'reference_eval_options.tsv')
def test_every_reference_option_keeps_its_name_type_and_default():
    for row in _reference_rows('reference_options.tsv'):
        _assert_same_option(opts._train_parser(), row)
    for beam_size, batch_size in ((1, 32), (3, 2)):  # eval.py; eval_cocotest.py (beam 3, batch 2)
        parser = opts.eval_parser(beam_size=beam_size, batch_size=batch_size)
        for row in _reference_rows('reference_eval_options.tsv'):
            if row['option'] in ('--beam_size', '--batch_size'):
                row = dict(row, default=str({'--beam_size': beam_size, '--batch_size': batch_size}[row['option']]))
            _assert_same_option(parser, row)
