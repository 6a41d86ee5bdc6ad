"""--cfg configs/<name>.yml: recipe files whose keys are option names; the command line overrides the file; unknown
keys and bad values are refused in one line (issue 29, "Recipes as config files")."""
import os
import re
import shlex

import pytest

import opts
from misc.errors import SaticError
from scripts import run_demo
from tests.helpers import REPO_ROOT, needs_shared, run_main, shared_path

CONFIGS = os.path.join(REPO_ROOT, 'configs')


def original_readme_stages():
    """The original README's two train.py command lines: SAT stage 1 and stage 2."""
    with open(shared_path('seed', 'original_README.md')) as f:
        text = f.read()
    return [shlex.split(m.group(1)) for m in re.finditer(r'^python3\s+train\.py\s+(.+)$', text, re.M)]


def baseline(argv, xe):
    """The baseline's stage: the SAT stage's command line with --caption_model transformer, K = 1, the plain COCO
    labels and its own run folder (the original README runs it before the SAT stages without printing it)."""
    run = 'transformer-baseline' if xe else 'nsc-transformer-baseline'
    replace = {'--K': '1', '--input_label_h5': 'data/cocotalk_label.h5', '--checkpoint_path': f'save/{run}',
               '--id': run, '--start_from': 'save/nsc-transformer-baseline'}
    out = ['--caption_model', 'transformer']
    for i, word in enumerate(argv):
        out.append(replace[argv[i - 1]] if i and argv[i - 1] in replace else word)
    return out


def resolved(argv):
    return vars(opts.parse_opt(argv))


@needs_shared('seed', 'original_README.md')
def test_each_coco_stage_resolves_to_its_original_command_line():
    stage1, stage2 = original_readme_stages()
    originals = {'sat_xe': stage1, 'sat_sc': stage2, 'transformer_xe': baseline(stage1, True),
                 'transformer_sc': baseline(stage2, False)}
    for name, argv in originals.items():
        from_file = resolved(['--cfg', os.path.join(CONFIGS, f'{name}.yml')])
        assert from_file == resolved(argv), name
        assert from_file != resolved([]), name


def test_each_demo_stage_resolves_to_the_demo_command_line():
    commands = run_demo.train_commands(run_demo.parse_args([]), 64)  # scripts/make_demo_data.py's --feat_dim 64
    assert set(commands) == {'transformer_xe', 'transformer_sc', 'sat_xe', 'sat_sc'}
    for name, argv in commands.items():
        from_file = resolved(['--cfg', os.path.join(CONFIGS, f'demo_{name}.yml')])
        assert from_file == resolved(argv), name
        assert from_file['input_json'] == 'data/demo/cocotalk.json'


def test_the_command_line_overrides_the_file():
    path = os.path.join(CONFIGS, 'sat_xe.yml')
    opt = opts.parse_opt(['--K', '4', '--cfg', path, '--learning_rate', '1e-4'])
    assert opt.K == 4 and opt.learning_rate == 1e-4  # the command line, before or after --cfg
    assert opt.num_layers == 6 and opt.noamopt is True and opt.max_epochs == 15  # the file
    assert not hasattr(opt, 'cfg')  # the resolved options are what the flags would give


def test_unknown_keys_bad_values_and_bad_files_are_one_line(tmp_path):
    cases = {'learnin_rate: 1\n': "unknown option 'learnin_rate'",
             'drop_prob_lm: 1.5\n': '--drop_prob_lm 1.5: must be in [0, 1)',
             'num_layers: 1.5\n': 'num_layers: 1.5 is not an integer',
             'num_layers: six\n': "num_layers: 'six' is not a valid int",
             'noamopt: 1\n': 'noamopt: 1 is not true or false',
             '- 1\n- 2\n': 'expected a mapping',
             'a: [1\n': 'not valid YAML'}
    for i, (text, fragment) in enumerate(cases.items()):
        path = tmp_path / f'c{i}.yml'
        path.write_text(text)
        rc, _, err = run_main(['--cfg', str(path)], tmp_path)
        assert rc == 2 and 'Traceback' not in err and err.count('\n') == 1, err
        assert fragment in err, err
        if 'unknown' in fragment:
            assert str(path) in err
    with pytest.raises(SaticError, match='no such file'):
        opts.parse_opt(['--cfg', str(tmp_path / 'missing.yml')])


def test_eval_reads_recipes_too(tmp_path):
    path = tmp_path / 'eval.yml'
    path.write_text('beam_size: 3\nsplit: val\n')
    opt = opts.parse_eval_opt(['--cfg', str(path), '--split', 'test'])
    assert opt.beam_size == 3 and opt.split == 'test'
