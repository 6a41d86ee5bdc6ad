"""Sequence-level knowledge distillation, the README's chain: a transformer baseline trained by train.py ->
`eval.py --seq_kd 1 --split train --beam_size 5` (the beam lists json) -> scripts/prepro_labels_seqKD.py (the seq-KD
label h5) -> SAT K=2 stage 1 on those labels, initialised from the baseline."""
import json
import os

import h5py
import numpy as np

import eval as eval_script
from misc.files.safe_load import load_pickle
from scripts import prepro_labels_seqKD
from tests.helpers import working_dir
from tests.helpers import run_main
from tests.test_train import make_scene_dataset

TEACHER_IMAGES = 50  # of the 200 train images: the others keep their ground truth


def labels_per_image(h5_path):
    """Per image, its label rows (n_i, 16)."""
    with h5py.File(h5_path, 'r') as f:
        labels, start, end = f['labels'][()], f['label_start_ix'][()], f['label_end_ix'][()]
    return [labels[s - 1:e] for s, e in zip(start, end)]


def test_beam_lists_become_the_seq_kd_labels_and_train_sat(tmp_path):
    scene = make_scene_dataset(str(tmp_path / 'data'))
    base = str(tmp_path / 'base')
    with working_dir(tmp_path):
        rc, _, err = run_main(scene.args(base, 'base', '--noamopt', '--noamopt_warmup', '50',
                                         '--max_iters', '100', '--save_checkpoint_every', '100'))
        assert rc == 0, err
        rc, out, err = run_main([
            '--model', os.path.join(base, 'model-best.pth'), '--infos_path', os.path.join(base, 'infos_base-best.pkl'),
            '--seq_kd', '1', '--split', 'train', '--beam_size', '5', '--language_eval', '0', '--batch_size', '25',
            '--num_images', str(TEACHER_IMAGES), '--id', 'base-train-b5'], main=eval_script.main)
        assert rc == 0, err
        with open('vis/base-train-b5_seq_kd.json') as f:
            beams = json.load(f)
        with open('vis/base-train-b5.json') as f:
            best = {entry['image_id']: entry['caption'] for entry in json.load(f)}

    with open(scene.path('dataset_coco.json')) as f:
        images = json.load(f)['images']
    train_ids = {img['cocoid'] for img in images if img['split'] == 'train'}
    assert len(beams) == TEACHER_IMAGES and len({b['image_id'] for b in beams}) == TEACHER_IMAGES
    for entry in beams:
        assert set(entry) == {'image_id', 'caption'} and isinstance(entry['image_id'], int)
        assert entry['image_id'] in train_ids
        assert len(entry['caption']) == 5 and all(isinstance(c, str) and c for c in entry['caption'])
        assert entry['caption'][0] == best[entry['image_id']]  # best beam first
    teacher = {entry['image_id']: entry['caption'] for entry in beams}

    kd = str(tmp_path / 'data' / 'cocotalk_seq-kd-from-base-b5')
    prepro_labels_seqKD.run(prepro_labels_seqKD.parse_args([
        '--input_json', scene.path('dataset_coco.json'), '--dict_json', scene.path('cocotalk.json'),
        '--teacher_json', str(tmp_path / 'vis' / 'base-train-b5_seq_kd.json'), '--output_h5', kd]))
    with open(scene.path('cocotalk.json')) as f:
        wtoi = {w: int(i) for i, w in json.load(f)['ix_to_word'].items()}
    kd_rows, truth_rows = labels_per_image(kd + '_label.h5'), labels_per_image(scene.path('cocotalk_label.h5'))
    assert len(kd_rows) == len(images)
    replaced = 0
    for img, rows, truth in zip(images, kd_rows, truth_rows):
        if img['cocoid'] in teacher:  # the teacher's 5 captions, encoded with the vocabulary
            expected = np.zeros((5, 16), dtype=np.uint32)
            for k, caption in enumerate(teacher[img['cocoid']]):
                ids = [wtoi[w] for w in caption.split()][:16]
                expected[k, :len(ids)] = ids
            np.testing.assert_array_equal(rows, expected)
            replaced += 1
        else:  # val/test, and train images the teacher did not caption: ground truth
            np.testing.assert_array_equal(rows, truth)
    assert replaced == TEACHER_IMAGES

    # SAT (K=2) stage 1 on the distilled labels, from the baseline's weights.
    sat = str(tmp_path / 'sat')
    with working_dir(tmp_path):
        rc, out, err = run_main(scene.args(
            sat, 'sat', '--caption_model', 'sat', '--K', '2', '--noamopt', '--noamopt_warmup', '50',
            '--max_iters', '3', '--init_from', os.path.join(base, 'model-best.pth'), label_h5=kd + '_label.h5'))
    assert rc == 0, err
    assert 'initialised from the autoregressive checkpoint' in out
    infos = load_pickle(os.path.join(sat, 'infos_sat.pkl'))
    assert infos['iter'] == 3 and infos['opt'].K == 2 and infos['opt'].input_label_h5 == kd + '_label.h5'
