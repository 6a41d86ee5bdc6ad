"""scripts/prepro_feats.py and models/resnet.py: the reference's ResNet grid features of image files (issue 26)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models.resnet as resnet
from dataloader import FeatureReader
from scripts import prepro_feats
from tests.helpers import SMALL_RESNET, assert_one_line_error, draw_images, random_resnet_weights, run_main

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def reference_pixels(path):
    """The reference's preprocessing, written independently (as its skimage path): grey stacked to three channels,
    alpha dropped, / 255, ImageNet mean/std -> (1, 3, H, W) float32."""
    pixels = np.asarray(Image.open(path))
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=2)
    pixels = pixels[:, :, :3].astype(np.float32) / 255.0
    return torch.from_numpy(((pixels - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]


def functional_features(state, layers, x, att_size):
    """The reference's network computed with torch.nn.functional straight from a state_dict: Caffe-style strides
    (in each stage's first 1x1 conv), max-pool without padding and with ceil_mode -> fc (2048,), att (a, a, 2048)."""
    def bn(y, name):
        return F.batch_norm(y, state[f'{name}.running_mean'], state[f'{name}.running_var'], state[f'{name}.weight'],
                            state[f'{name}.bias'], False, 0.0, 1e-5)
    x = F.relu(bn(F.conv2d(x, state['conv1.weight'], stride=2, padding=3), 'bn1'))
    x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
    for stage, blocks in enumerate(layers, 1):
        for block in range(blocks):
            p = f'layer{stage}.{block}'
            stride = 2 if stage > 1 and block == 0 else 1
            out = F.relu(bn(F.conv2d(x, state[f'{p}.conv1.weight'], stride=stride), f'{p}.bn1'))
            out = F.relu(bn(F.conv2d(out, state[f'{p}.conv2.weight'], padding=1), f'{p}.bn2'))
            out = bn(F.conv2d(out, state[f'{p}.conv3.weight']), f'{p}.bn3')
            if f'{p}.downsample.0.weight' in state:
                x = bn(F.conv2d(x, state[f'{p}.downsample.0.weight'], stride=stride), f'{p}.downsample.1')
            x = F.relu(out + x)
    fc = x.mean(dim=(2, 3))[0]
    att = F.adaptive_avg_pool2d(x, att_size)[0].permute(1, 2, 0)
    return fc.numpy(), att.numpy()


def test_resnet101_and_152_have_torchvisions_names_and_sizes():
    for name, params in (('resnet101', 44_549_160), ('resnet152', 60_192_808)):  # torchvision's counts
        net = resnet.resnet(name)
        assert sum(p.numel() for p in net.parameters()) == params
    state = resnet.resnet('resnet101').state_dict()
    assert tuple(state['layer3.22.conv3.weight'].shape) == (1024, 256, 1, 1)
    assert tuple(state['layer4.0.downsample.0.weight'].shape) == (2048, 1024, 1, 1)
    assert 'layer4.0.downsample.1.running_var' in state and tuple(state['fc.weight'].shape) == (1000, 2048)
    block = resnet.resnet('resnet101').layer2[0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))  # Caffe-style: stride in the 1x1


@pytest.fixture
def small_depth(monkeypatch):
    """prepro_feats' resnet101 built with one block per stage (a fast test network of the same structure)."""
    monkeypatch.setitem(resnet.DEPTHS, 'resnet101', SMALL_RESNET)


def karpathy_json(path, names):
    images = [{'filepath': os.path.dirname(n), 'filename': os.path.basename(n), 'cocoid': 100 + i}
              for i, n in enumerate(names)]
    with open(path, 'w') as f:
        json.dump({'images': images}, f)
    return [im['cocoid'] for im in images]


def test_prepro_feats_equals_the_functional_network(tmp_path, small_depth):
    names = ['val2014/a.jpg', 'val2014/b_grey.png', 'train2014/c_rgba.png']
    paths = draw_images(str(tmp_path / 'images'), names)
    state = random_resnet_weights(str(tmp_path / 'weights' / 'resnet101.pth'))
    ids = karpathy_json(tmp_path / 'dataset.json', names)
    for att_size in (14, 7):
        out = str(tmp_path / f'feats{att_size}')
        rc, stdout, err = run_main(['--input_json', tmp_path / 'dataset.json', '--output_dir', out, '--images_root',
                                    tmp_path / 'images', '--model_root', tmp_path / 'weights', '--att_size', att_size,
                                    '--device', 'cpu', '--batch_size', 2], main=prepro_feats.main)
        assert rc == 0, err
        for iid, path in zip(ids, paths):
            fc = np.load(os.path.join(out + '_fc', f'{iid}.npy'))
            att = np.load(os.path.join(out + '_att', f'{iid}.npz'))['feat']
            assert fc.shape == (2048,) and att.shape == (att_size, att_size, 2048)
            assert fc.dtype == att.dtype == np.float32
            with torch.no_grad():
                want_fc, want_att = functional_features(state, SMALL_RESNET, reference_pixels(path), att_size)
            np.testing.assert_allclose(fc, want_fc, rtol=1e-4, atol=1e-4 * np.abs(want_fc).max())
            np.testing.assert_allclose(att, want_att, rtol=1e-4, atol=1e-4 * np.abs(want_att).max())
        # The data loader reads the grid as att_size^2 regions, like bottom-up ones.
        reader = FeatureReader(out + '_att', '.npz', '--input_att_dir')
        regions = reader.get(ids[0], regions=True)
        assert regions.reshape(-1, 2048).shape == (att_size * att_size, 2048)


def test_prepro_feats_resumes_and_never_leaves_a_half_file(tmp_path, small_depth, monkeypatch):
    names = ['x/a.jpg', 'x/b.png', 'x/c.jpg']
    draw_images(str(tmp_path / 'images'), names)
    random_resnet_weights(str(tmp_path / 'w' / 'resnet101.pth'))
    ids = karpathy_json(tmp_path / 'd.json', names)
    out = str(tmp_path / 'f')
    argv = ['--input_json', tmp_path / 'd.json', '--output_dir', out, '--images_root', tmp_path / 'images',
            '--model_root', tmp_path / 'w', '--device', 'cpu', '--batch_size', 1]
    real_save, calls = np.save, []

    def dying_save(f, array, *args, **kwargs):  # the second image's fc file: killed while writing it
        calls.append(1)
        if len(calls) == 2:
            f.write(b'\x93NUMPY partial')
            raise KeyboardInterrupt
        return real_save(f, array, *args, **kwargs)
    monkeypatch.setattr(np, 'save', dying_save)
    rc, _, err = run_main(argv, main=prepro_feats.main)
    assert rc == 130, err
    monkeypatch.setattr(np, 'save', real_save)
    assert sorted(os.listdir(out + '_fc')) == [f'{ids[0]}.npy']  # no partial file, no temp file
    assert all(not n.startswith('.') for n in os.listdir(out + '_att'))
    first = os.stat(os.path.join(out + '_fc', f'{ids[0]}.npy'))
    rc, stdout, err = run_main(argv, main=prepro_feats.main)
    assert rc == 0, err
    assert '1 already done, 2 to compute' in stdout
    assert os.stat(os.path.join(out + '_fc', f'{ids[0]}.npy')).st_mtime_ns == first.st_mtime_ns  # not redone
    assert sorted(os.listdir(out + '_fc')) == sorted(f'{i}.npy' for i in ids)
    rc, stdout, _ = run_main(argv, main=prepro_feats.main)
    assert rc == 0 and '3 already done, 0 to compute' in stdout


def test_prepro_feats_bad_inputs_are_one_line(tmp_path, small_depth):
    names = ['x/a.jpg', 'x/broken.jpg']
    draw_images(str(tmp_path / 'images'), names[:1])
    (tmp_path / 'images' / 'x' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    ids = karpathy_json(tmp_path / 'd.json', names)
    argv = ['--input_json', tmp_path / 'd.json', '--output_dir', tmp_path / 'f', '--images_root',
            tmp_path / 'images', '--model_root', tmp_path / 'w', '--device', 'cpu']
    line = assert_one_line_error(run_main(argv, main=prepro_feats.main), 'resnet101.pth', 'file not found')
    assert 'imagenet_weights' in line
    assert not os.path.exists(tmp_path / 'f_fc')  # a refused start leaves no empty folder behind
    random_resnet_weights(str(tmp_path / 'w' / 'resnet101.pth'))
    rc, _, err = run_main(argv, main=prepro_feats.main)
    assert rc == 2 and 'broken.jpg: not a readable image' in err and '1 images of' in err
    assert os.path.isfile(tmp_path / 'f_fc' / f'{ids[0]}.npy')  # the readable one is done
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'w' / 'resnet101.pth')
    assert_one_line_error(run_main(argv[:3] + [tmp_path / 'g'] + argv[4:], main=prepro_feats.main),
                          'does not fit resnet101')


def test_prepro_feats_resnet101_at_full_depth(tmp_path):
    """The real resnet101 (no small_depth), one 64x64 grey image: the reference's network, block for block."""
    paths = draw_images(str(tmp_path / 'images'), ['x/grey.png'], size=(64, 64))
    state = random_resnet_weights(str(tmp_path / 'w' / 'resnet101.pth'), resnet.DEPTHS['resnet101'])
    ids = karpathy_json(tmp_path / 'd.json', ['x/grey.png'])
    rc, _, err = run_main(['--input_json', tmp_path / 'd.json', '--output_dir', tmp_path / 'f', '--images_root',
                           tmp_path / 'images', '--model_root', tmp_path / 'w', '--device', 'cpu'],
                          main=prepro_feats.main)
    assert rc == 0, err
    with torch.no_grad():
        want_fc, want_att = functional_features(state, resnet.DEPTHS['resnet101'], reference_pixels(paths[0]), 14)
    att = np.load(tmp_path / 'f_att' / f'{ids[0]}.npz')['feat']
    assert att.shape == (14, 14, 2048)
    np.testing.assert_allclose(att, want_att, rtol=1e-4, atol=1e-4 * np.abs(want_att).max())
    np.testing.assert_allclose(np.load(tmp_path / 'f_fc' / f'{ids[0]}.npy'), want_fc, rtol=1e-4,
                               atol=1e-4 * np.abs(want_fc).max())
