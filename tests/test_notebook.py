"""example.ipynb runs end to end (issue 26): its code cells executed in order as one script (no Jupyter needed),
on tiny runs this test builds, through the environment variables the notebook reads."""
import io
import json
import os
import contextlib

from tests.helpers import REPO_ROOT, draw_images, run_main, targs, tiny_checkpoint
from tests.test_captioner import grid_run, small_depth  # noqa: F401 (fixtures: a run trained on grid features)


def notebook_code(path):
    with open(path) as f:
        notebook = json.load(f)
    return [''.join(cell['source']) for cell in notebook['cells'] if cell['cell_type'] == 'code']


def test_example_notebook_runs(tiny_dataset, grid_run, tmp_path, monkeypatch):  # noqa: F811
    sat_model, _ = tiny_checkpoint(tiny_dataset, str(tmp_path / 'sat'))
    rc, _, err = run_main(targs(tiny_dataset, 'tf', '--max_iters', 2, '--save_checkpoint_every', 2), cwd=tmp_path)
    assert rc == 0, err
    draw_images(str(tmp_path / 'pictures'), ['a.jpg', 'b_grey.png'])
    monkeypatch.setenv('SATIC_REPO', REPO_ROOT)
    monkeypatch.setenv('SATIC_RUNS', f"{tmp_path / 'tf'},{tmp_path / 'sat'}")
    monkeypatch.setenv('SATIC_INPUT_JSON', tiny_dataset.input_json)
    monkeypatch.setenv('SATIC_ATT_DIR', tiny_dataset.att_dir)
    monkeypatch.setenv('SATIC_IMAGE_RUN', str(grid_run / 'save' / 'grid'))
    monkeypatch.setenv('SATIC_IMAGES', str(tmp_path / 'pictures'))
    monkeypatch.chdir(grid_run)  # data/imagenet_weights/resnet101.pth, relative to the working directory
    namespace, out = {'__name__': '__notebook__'}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for number, source in enumerate(notebook_code(os.path.join(REPO_ROOT, 'example.ipynb'))):
            exec(compile(source, f'example.ipynb code cell {number}', 'exec'), namespace)
    text = out.getvalue()
    print(text)
    assert set(namespace['captioners']) == {'tf', 'sat'}
    assert 'tf: transformer, K=1' in text and 'sat: sat, K=2' in text
    assert text.count('image ') >= len(namespace['images']) == 3  # the tiny test split, side by side
    assert 'regions:' in text or 'empty caption' in text
    assert f"{tmp_path / 'pictures' / 'a.jpg'}: " in text and 'b_grey.png: ' in text
