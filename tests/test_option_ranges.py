"""Every option of every entry point declares its range or choice set (misc/options/configs.py), checked once at parse time:
a bad value of each gives exit 2 and one 'error:' line naming the flag (no traceback), a boundary value is accepted;
--help shows every option's help and default in the same groups everywhere (issues 28 and 29)."""
import argparse
import re

import pytest

import eval as eval_script
import eval_cocotest
import eval_ensemble
import opts
import train
from misc.options import optspec
from tests.helpers import run_main

ENTRY_POINTS = {  # name: (parser builder, parse function, main)
    'train.py': (opts._train_parser, opts.parse_opt, train.main),
    'eval.py': (opts.eval_parser, opts.parse_eval_opt, eval_script.main),
    'eval_cocotest.py': (opts.eval_parser, eval_cocotest.parse_args, eval_cocotest.main),
    'eval_ensemble.py': (eval_ensemble.build_parser, eval_ensemble.parse_args, eval_ensemble.main),
}
# Flags an option's check needs to act (an option inert otherwise accepts any value, as in the reference) or that
# a boundary value needs to be a valid combination.
ACTS_WITH = {'noamopt_factor': ['--noamopt']}
KD = ['--kd_weight', '1', '--teacher_model', 'x.pth']
GOOD_WITH = {'noamopt_factor': ['--noamopt'], 'teacher_eval_mode': KD, 'teacher_model': KD, 'teacher_infos': KD}
FORCED = {('eval_cocotest.py', 'language_eval'), ('eval_cocotest.py', 'input_label_h5')}  # no references there


def cases():
    for entry, (build, parse, main) in ENTRY_POINTS.items():
        for name, field in build().option_fields.items():
            yield pytest.param(entry, name, field, id=f'{entry}:{name}')


def test_every_option_is_declared_with_a_range_help_and_group():
    for entry, (build, _, _) in ENTRY_POINTS.items():
        parser = build()
        dests = {a.dest for a in parser._actions if a.option_strings} - {'help', 'cfg'}
        assert dests == set(parser.option_fields), entry  # no option added around the configs
        for name, field in parser.option_fields.items():
            check = field.metadata['check']
            assert isinstance(check, optspec.Check) and field.metadata['help'], (entry, name)
            if check in optspec.UNCHECKED:  # paths and names (checked where opened), the reference's inert options
                assert field.type in (str, tuple) or field.metadata['group'] == optspec.INERT, (entry, name)


@pytest.mark.parametrize('entry, name, field', cases())
def test_a_bad_value_is_refused_in_one_line_naming_the_flag(entry, name, field, tmp_path):
    build, parse, main = ENTRY_POINTS[entry]
    check = field.metadata['check']
    if check in optspec.UNCHECKED:
        pytest.skip('any value (declared: a path, a name or an inert reference option)')
    if check.bad is None:  # a flag (--noamopt): only a recipe file can give it a non-boolean value
        cfg = tmp_path / 'bad.yml'
        cfg.write_text(f'{name}: 5\n')
        argv = ['--cfg', str(cfg)]
    else:
        argv = ACTS_WITH.get(name, []) + [f'--{name}', str(check.bad)]
    rc, out, err = run_main(argv, tmp_path, main)
    assert rc == 2 and 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and name in lines[0], err
    if check.bad is not None:  # the flag and the value as given
        assert re.match(rf"error: (argument )?--{name}\b.*{re.escape(str(check.bad))}", lines[0]), lines[0]


@pytest.mark.parametrize('entry, name, field', cases())
def test_a_boundary_value_is_accepted(entry, name, field):
    build, parse, main = ENTRY_POINTS[entry]
    check = field.metadata['check']
    if check.good is None or field.metadata['action'] or field.metadata['nargs']:
        pytest.skip('no boundary (any value, a flag or a list)')
    if (entry, name) in FORCED:
        pytest.skip('set by the entry point')
    opt = parse(GOOD_WITH.get(name, []) + [f'--{name}', str(check.good)])
    assert getattr(opt, name) == field.metadata['flag_type'](str(check.good)) if field.metadata['flag_type'] \
        else getattr(opt, name) == (field.type(check.good) if name != 'K' else opt.K)


def test_the_issue_examples_are_refused_with_what_is_allowed(tmp_path):
    for argv, line in (
            (['--drop_prob_lm', '1.5'], 'error: --drop_prob_lm 1.5: must be in [0, 1)'),
            (['--input_encoding_size', '30'], 'error: --input_encoding_size 30: must be a multiple of 8'),
            (['--num_layers', '0'], 'error: --num_layers 0: must be >= 1'),
            (['--rnn_size', '0'], 'error: --rnn_size 0: must be >= 1'),
            (['--device', 'bogus'], "error: --device 'bogus': must be"),
            (['--label_smoothing', '1.5'], 'error: --label_smoothing 1.5: must be in [0, 1)'),
            (['--bleu_reward_weight', '-1'], 'error: --bleu_reward_weight -1.0: must be >= 0'),
            (['--kd_weight', '-1'], 'error: --kd_weight -1.0: must be >= 0'),
            (['--max_length', '-1'], 'error: --max_length -1: must be >= 1'),
            (['--self_critical_after', '0', '--cider_reward_weight', '0'],
             'error: --self_critical_after 0 with every reward weight 0')):
        rc, _, err = run_main(argv, tmp_path)
        assert rc == 2 and err.startswith(line) and err.count('\n') == 1, err


def test_options_inert_in_a_mode_accept_any_value_there():
    # as in the reference: --optim/--learning_rate/--optim_alpha... do nothing with --noamopt
    opt = opts.parse_opt(['--noamopt', '--optim', 'bogus', '--optim_alpha', '5', '--learning_rate', '0'])
    assert opt.optim == 'bogus' and opt.optim_alpha == 5
    with pytest.raises(opts.SaticError, match=r'--optim_alpha 5.0: must be in \[0, 1\) \(without --noamopt\)'):
        opts.parse_opt(['--optim_alpha', '5'])


def test_self_critical_that_never_starts_is_a_warning(capsys):
    opts.parse_opt(['--self_critical_after', '30', '--max_epochs', '30'])
    assert 'warning: --self_critical_after 30 >= --max_epochs 30' in capsys.readouterr().err


def test_help_shows_every_default_in_the_same_groups_everywhere():
    for entry, (build, _, _) in ENTRY_POINTS.items():
        parser = build()
        formatter = argparse.ArgumentDefaultsHelpFormatter(entry)
        for action in parser._actions:
            if action.dest == 'help':
                continue
            assert action.help and '%(default)' in formatter._get_help_string(action), (entry, action.dest)
        groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups if g._group_actions}
        shown = [title for title in groups if title in optspec.GROUPS]
        assert shown == [g for g in optspec.GROUPS if g in shown], entry  # the users' order
        assert {'beam_size', 'max_length'} <= groups[optspec.DECODING], entry
        assert not {'device', 'bf16', 'compile'} & groups[optspec.DECODING], entry
        assert {'device', 'bf16', 'compile', 'cuda_graphs'} <= groups[optspec.DEVICES], entry
        text = parser.format_help()
        assert len(re.findall(r'\(default:\s', text)) >= len(parser._actions) - 1, entry
        if entry == 'train.py':
            assert set(optspec.GROUPS) <= set(groups)


def test_scripts_check_their_numeric_flags(tmp_path):
    from scripts import make_bu_data, make_demo_data, make_viewer, prepro_labels, prepro_labels_seqKD
    for module, argv, line in (
            (make_bu_data, ['--num_workers', '0'], 'error: --num_workers 0: must be >= 1'),
            (make_demo_data, ['--feat_dim', '0'], 'error: --feat_dim 0: must be >= 1'),
            (make_demo_data, ['--min_boxes', '5', '--max_boxes', '3'], 'error: --max_boxes 3: must be >= 5'),
            (make_viewer, ['--runs', 'a', '--link_images', '2'], 'error: --link_images 2: must be one of 0, 1'),
            (prepro_labels, ['--input_json', 'x', '--max_length', '0'], 'error: --max_length 0: must be >= 1'),
            (prepro_labels, ['--input_json', 'x', '--word_count_threshold', '-1'], 'error: --word_count_threshold -1'),
            (prepro_labels_seqKD, ['--max_length', '-1'], 'error: --max_length -1: must be >= 1')):
        rc, _, err = run_main(argv, tmp_path, module.main)
        assert rc == 2 and err.startswith(line) and err.count('\n') == 1, (module.__name__, err)


def test_make_viewer_help_keeps_its_example_lines(capsys):
    from scripts import make_viewer
    with pytest.raises(SystemExit):
        make_viewer.parse_args(['--help'])
    text = capsys.readouterr().out
    assert '--runs vis/a.json,vis/b.json \\\n      --scores' in text
    assert not re.search(r'\S {3,}--', text.split('\n\n', 2)[-1].split('--runs vis/a.json')[-1])
