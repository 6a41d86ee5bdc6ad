"""The README works as printed: its size and links, every command's script and flags, and the quick start.

The commands are taken from the README itself (its ``` blocks), so a renamed flag or script, or a link to a file a
clone lacks, turns this red. The quick start runs for real (make quickstart, a few iterations) in a scratch folder
that links the repository's files, so nothing is written into the checkout.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

README = os.path.join(REPO_ROOT, 'README.md')
ENTRY_POINTS = ('train.py', 'eval.py', 'eval_cocotest.py', 'eval_ensemble.py')


def readme_text():
    with open(README) as f:
        return f.read()


def readme_commands():
    """Every `python X.py ...` command line of the README: its code blocks' lines (comments and `cd` prefixes
    removed) and its inline `python ...` spans."""
    commands = []
    text = readme_text()
    lines = [line for block in re.findall(r'```[a-z]*\n(.*?)```', text, flags=re.S) for line in block.splitlines()]
    lines += re.findall(r'(?<!`)`(python3? [^`]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
    for line in lines:
        line = line.split('  #')[0].strip()
        for part in line.split('&&'):
            part = part.strip()
            if re.match(r'python3? \S+\.py', part):
                commands.append(shlex.split(part)[1:])
    return commands


def test_readme_is_short_and_cites_no_file_a_clone_lacks():
    text = readme_text()
    assert len(text.splitlines()) <= 200
    assert '../shared' not in text
    for target in re.findall(r'\]\(([^)#]+)\)', text):
        if '://' in target:
            continue
        assert os.path.exists(os.path.join(REPO_ROOT, target)), f'README links {target}, which a clone lacks'


def test_readme_commands_name_real_scripts_and_flags():
    """Each command's script exists, and every --flag it passes is one its --help lists."""
    commands = readme_commands()
    scripts = {argv[0] for argv in commands}
    assert {'train.py', 'eval.py', 'scripts/prepro_feats.py', 'scripts/make_bu_data.py'} <= scripts  # the README's main commands were found
    helps = {}
    for argv in commands:
        script = argv[0]
        assert os.path.isfile(os.path.join(REPO_ROOT, script)), f'README runs {script}, which does not exist'
        if script not in helps:
            proc = subprocess.run([sys.executable, script, '--help'], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr
            helps[script] = set(re.findall(r'--\w+', proc.stdout))
        for flag in (a for a in argv[1:] if a.startswith('--')):
            assert flag in helps[script], f'README: {script} {flag}: not an option of {script} (see its --help)'


@pytest.mark.parametrize('script', ENTRY_POINTS)
def test_help_shows_a_default_and_help_for_every_option(script):
    proc = subprocess.run([sys.executable, script, '--help'], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'COLUMNS': '200'})
    assert proc.returncode == 0, proc.stderr
    entries = re.split(r'\n  (?=--)', proc.stdout)[1:]
    assert len(entries) > 20
    for entry in entries:
        flag = entry.split()[0]
        if flag in ('--help',):
            continue
        assert '(default:' in entry, f'{script} --help: {flag} shows no default'
        assert len(entry.split('(default:')[0].split(None, 2)) > 2, f'{script} --help: {flag} has no help text'


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('java') is None, reason='the quick start evaluates with the COCO metrics (Java)')
@pytest.mark.skipif(shutil.which('make') is None, reason='make is not installed')
def test_quickstart_runs_as_printed(tmp_path):
    """`make quickstart` with a few iterations: a model, its captions, its scores and the viewer page."""
    for name in os.listdir(REPO_ROOT):
        if name not in ('data', 'save', 'vis', 'eval_results', '.git'):
            os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    os.makedirs(tmp_path / 'data')
    demo = os.path.join(REPO_ROOT, 'data', 'demo')
    if os.path.isfile(os.path.join(demo, '.demo_stamp.json')):
        os.symlink(demo, tmp_path / 'data' / 'demo')  # built by make demo already: reuse it
    flags = '--max_iters 20 --save_checkpoint_every 20 --val_images_use 20 --losses_log_every 10'
    proc = subprocess.run(['make', 'quickstart', f'QUICK_FLAGS={flags}', f'PY={sys.executable}'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / 'save' / 'quickstart' / 'model-best.pth').is_file()
    page = (tmp_path / 'vis' / 'quickstart.html').read_text()
    assert 'quickstart' in page and 'CIDEr' in page
    assert 'vis/quickstart.html' in proc.stdout
    assert re.search(r'CIDEr: \d', proc.stdout), 'eval.py printed no CIDEr'
