"""Own images and the Python API (issue 26): eval.py --image_folder, captioner.Captioner, hubconf.py, and the
checkpoint-derived defaults of eval.py, on a tiny model trained on grid features of generated images."""
import json
import os

import numpy as np
import pytest
import torch

import eval as eval_script
import eval_ensemble
import models.resnet as resnet
from captioner import Captioner
from scripts import prepro_feats
from tests.helpers import (REPO_ROOT, SMALL_RESNET, assert_one_line_error, draw_images, make_tiny_dataset,
                           random_resnet_weights, run_main, targs, tiny_checkpoint)


@pytest.fixture(scope='module')
def small_depth():
    """resnet101 built with one block per stage (a fast network of the same structure) for the whole module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(resnet.DEPTHS, 'resnet101', SMALL_RESNET)
        yield


@pytest.fixture(scope='module')
def grid_run(tmp_path_factory, small_depth):
    """A folder with data/imagenet_weights/resnet101.pth (random, torchvision names), the tiny dataset's images
    drawn under images/, their 7x7 grid features (prepro_feats.py) and save/grid/, a transformer trained on them for
    one iteration (train.py; longer, this tiny model says the same words for every picture)."""
    root = tmp_path_factory.mktemp('grid')
    ds = make_tiny_dataset(root / 'tiny', n_train=6, n_val=2, n_test=2, feat_dim=8)
    with open(ds.dataset_json) as f:
        entries = json.load(f)['images']
    draw_images(str(root / 'images'), [os.path.join(e['filepath'], e['filename']) for e in entries])
    random_resnet_weights(str(root / 'data' / 'imagenet_weights' / 'resnet101.pth'))
    rc, _, err = run_main(['--input_json', ds.dataset_json, '--output_dir', 'grid', '--images_root', 'images',
                           '--att_size', 7, '--model_root', 'data/imagenet_weights', '--device', 'cpu'],
                          cwd=root, main=prepro_feats.main)
    assert rc == 0, err
    rc, _, err = run_main(targs(ds, 'save/grid', '--input_att_dir', 'grid_att', '--input_fc_dir', 'grid_fc',
                                '--att_feat_size', 2048, '--max_iters', 1, '--save_checkpoint_every', 1,
                                run_id='grid'), cwd=root)
    assert rc == 0, err
    return root


def test_own_images_same_captions_from_eval_the_api_and_torch_hub(grid_run, monkeypatch):
    monkeypatch.chdir(grid_run)
    paths = draw_images('mine', ['one.jpg', 'sub/two_grey.png', 'three_rgba.png'], size=(48, 40), seed=5)
    (grid_run / 'mine' / 'notes.txt').write_text('not an image')
    (grid_run / 'mine' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    # --att_size: the 7x7 grid of the run's training features (read from its --input_att_dir)
    rc, out, err = run_main(['--model', 'save/grid/model.pth', '--image_folder', 'mine', '--dump_images', 1,
                             '--device', 'cpu'], main=eval_script.main)
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.startswith('skipped')] == [
        'skipped: mine/notes.txt: not an image file (by its extension)',
        next(line for line in err.splitlines() if 'broken.jpg' in line)]
    assert 'Traceback' not in err and 'captioned 3 images of mine (1 skipped)' in out
    assert 'no COCO metrics' in out  # --language_eval 1 (the default) has no references to score here
    predictions = json.loads((grid_run / 'vis' / 'grid.json').read_text())  # --id: the run's own
    by_file = {p['file_path']: p['caption'] for p in predictions}
    assert sorted(by_file) == ['one.jpg', 'sub/two_grey.png', 'three_rgba.png']
    assert len(os.listdir(grid_run / 'vis' / 'imgs')) == 3 and '<img' in (grid_run / 'vis' / 'index.html').read_text()
    want = [by_file[os.path.relpath(p, 'mine')] for p in paths]
    assert all(want) and len(set(want)) == 3  # captions that depend on the image: the comparisons below mean something

    api = Captioner.from_run('save/grid', device='cpu', att_size=7)
    assert api.trained_grid() == 7 and api.extractor().att_size == 7
    assert api.caption_images(paths) == want
    assert api.caption_images(paths[0]) == want[0]
    hub = torch.hub.load(REPO_ROOT, 'captioner', 'save/grid', source='local', device='cpu')
    assert hub.caption_images(paths) == want
    # The features prepro_feats.py writes for these images give the same captions.
    with open('mine.json', 'w') as f:
        json.dump({'images': [{'filepath': '', 'filename': os.path.relpath(p, 'mine'), 'cocoid': i}
                              for i, p in enumerate(paths)]}, f)
    assert run_main(['--input_json', 'mine.json', '--output_dir', 'mine_feats', '--images_root', 'mine',
                     '--att_size', 7, '--device', 'cpu'], main=prepro_feats.main)[0] == 0
    assert api.caption([f'mine_feats_att/{i}.npz' for i in range(3)]) == want
    with_attention = api.caption(f'mine_feats_att/0.npz', attention=True, beam_size=2)
    assert with_attention['caption'] == ' '.join(with_attention['words'])
    assert with_attention['attention'].shape == (len(with_attention['words']), 49)
    np.testing.assert_allclose(with_attention['attention'].sum(1), 1, rtol=1e-4)
    # --coco_json: only the images it lists, under its ids; an ensemble captions folders too.
    with open('coco.json', 'w') as f:
        json.dump({'images': [{'id': 42, 'file_name': 'one.jpg'}]}, f)
    rc, _, err = run_main(['--model', 'save/grid/model.pth', '--image_folder', 'mine', '--coco_json', 'coco.json',
                           '--att_size', 7, '--device', 'cpu', '--id', 'listed'], main=eval_script.main)
    assert rc == 0, err
    assert json.loads((grid_run / 'vis' / 'listed.json').read_text()) == [
        {'image_id': 42, 'caption': want[0], 'file_path': 'one.jpg'}]
    rc, _, err = run_main(['--model', 'save/grid/model.pth', '--image_folder', 'mine', '--num_images', 2,
                           '--att_size', 7, '--device', 'cpu', '--id', 'two'], main=eval_script.main)
    assert rc == 0, err
    first_two = json.loads((grid_run / 'vis' / 'two.json').read_text())  # --num_images: the first N image files
    assert [p['image_id'] for p in first_two] == [2]  # (1 is broken.jpg, skipped)
    infos = 'save/grid/infos_grid.pkl'
    rc, _, err = run_main(['--models', 'save/grid/model.pth', 'save/grid/model.pth', '--infos_paths', infos, infos,
                           '--image_folder', 'mine', '--att_size', 7, '--device', 'cpu', '--id', 'ens'],
                          main=eval_ensemble.main)
    assert rc == 0, err
    assert {p['file_path']: p['caption'] for p in json.loads((grid_run / 'vis' / 'ens.json').read_text())} == by_file


def test_image_mode_refusals_are_one_line_and_leave_no_folder(grid_run, tmp_path, monkeypatch, small_depth):
    monkeypatch.chdir(tmp_path)
    model = str(grid_run / 'save' / 'grid' / 'model.pth')
    draw_images('pics', ['a.jpg'])
    line = assert_one_line_error(run_main(['--model', model, '--image_folder', 'pics', '--device', 'cpu'],
                                          main=eval_script.main), 'resnet101.pth', 'file not found')
    assert 'data/imagenet_weights/resnet101.pth' in line  # where it looked, relative to the working directory
    assert_one_line_error(run_main(['--model', model, '--image_folder', 'nowhere'], main=eval_script.main),
                          '--image_folder nowhere')
    assert_one_line_error(run_main(['--model', model, '--coco_json', 'c.json'], main=eval_script.main),
                          '--coco_json', '--image_folder')
    assert_one_line_error(run_main(['--model', 'save/none/model.pth'], main=eval_script.main),
                          '--model save/none/model.pth', 'not found')
    assert_one_line_error(run_main(['--model', model, '--image_folder', 'pics', '--dump_attention', 3],
                                   main=eval_script.main), '--dump_attention', 'attention=True')
    assert sorted(os.listdir(tmp_path)) == ['pics']  # no vis/, eval_results/ left behind
    api = Captioner.from_run(str(grid_run / 'save' / 'grid'), device='cpu')
    with pytest.raises(Exception, match='reads 2048-d'):
        api.caption(np.zeros((3, 8), np.float32))
    with pytest.raises(Exception, match='unknown decoding option'):
        api.caption(np.zeros((3, 2048), np.float32), beam=3)
    with pytest.raises(Exception, match='not a run folder'):
        Captioner.from_run(str(tmp_path / 'pics' / 'missing'))


@pytest.fixture(scope='module')
def split_runs(tiny_dataset, tmp_path_factory):
    """A SAT K=2 checkpoint (tiny_checkpoint, trained briefly) and a transformer run folder (train.py)."""
    root = tmp_path_factory.mktemp('split_runs')
    sat_model, _ = tiny_checkpoint(tiny_dataset, str(root / 'sat'), train_steps=40)
    rc, _, err = run_main(targs(tiny_dataset, 'transformer', '--max_iters', 20, '--save_checkpoint_every', 20,
                                run_id='tf'), cwd=root)
    assert rc == 0, err
    return {'sat': sat_model, 'transformer': str(root / 'transformer' / 'model.pth')}


@pytest.mark.parametrize('model', ['sat', 'transformer'])
def test_api_captions_equal_eval_on_the_test_split(tiny_dataset, split_runs, model, tmp_path):
    model_path = split_runs[model]
    api = Captioner.from_checkpoint(model_path, device='cpu')
    for beam in (1, 3):
        # --model alone: the infos beside it, the run's own id (vis/tiny.json, vis/tf.json)
        rc, out, err = run_main(['--model', model_path, '--language_eval', 0, '--beam_size', beam, '--device', 'cpu',
                                 '--num_workers', 0], cwd=tmp_path, main=eval_script.main)
        assert rc == 0, err
        predictions = json.loads((tmp_path / 'vis' / f"{api.opt.id}.json").read_text())
        assert len(predictions) == 3
        features = [os.path.join(tiny_dataset.att_dir, f"{p['image_id']}.npz") for p in predictions]
        assert api.caption(features, beam_size=beam) == [p['caption'] for p in predictions]
    assert api.opt.id == {'sat': 'tiny', 'transformer': 'tf'}[model]
    # Precision as eval.py's: --bf16 1 (autocast) for both.
    rc, _, err = run_main(['--model', model_path, '--language_eval', 0, '--bf16', 1, '--device', 'cpu',
                           '--num_workers', 0, '--id', 'bf16'], cwd=tmp_path, main=eval_script.main)
    assert rc == 0, err
    predictions = json.loads((tmp_path / 'vis' / 'bf16.json').read_text())
    features = [os.path.join(tiny_dataset.att_dir, f"{p['image_id']}.npz") for p in predictions]
    bf16 = Captioner.from_checkpoint(model_path, device='cpu', bf16=1)
    assert bf16.caption(features) == [p['caption'] for p in predictions]
