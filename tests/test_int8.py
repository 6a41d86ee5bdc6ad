"""--quantize int8 (models/accel/speed.py) is right on every x86 CPU, whichever int8 kernel fbgemm picks for it.

fbgemm's AVX2 kernel (CPUs without VNNI) adds uint8 x int8 products in int16 pairs that saturate; its VNNI kernel
does not. FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes fbgemm use its AVX2 kernel on any x86 CPU, so both kernels are
tested on every machine: the AVX2 cases run in a subprocess with that variable set (fbgemm reads it once).
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from models.accel.speed import (Int8Linear, concatenated, cpu_flags, fbgemm_int8_available, int8_kernel,
                          int8_kernel_saturates, int8_weight_bits, quantize_int8)
from models.transformer import MultiHeadedAttention
from tests.helpers import tiny_sat, REPO_ROOT, masked_batch, tiny_checkpoint

pytestmark = [pytest.mark.skipif(not fbgemm_int8_available(), reason='no fbgemm int8 kernels in this torch build'),
              pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')]  # torch's notes

AVX2 = {'FBGEMM_ENABLE_INSTRUCTIONS': 'AVX2'}
BOUND = 0.03  # relative error of one int8 layer on N(0, 3) inputs; a saturating kernel is ~17% off


def in_avx2_process(expression):
    """The json value of `expression` (over this module, as t) evaluated in a python process on fbgemm's AVX2
    kernel."""
    code = f'import json, tests.test_int8 as t; print(json.dumps({expression}))'
    done = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=dict(os.environ, **AVX2),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_errors(weight_bits=None):
    """{layer: ||int8 - fp32|| / ||fp32||} for a 512 -> 2048 layer and an attention's fused q|k|v (the paper's
    sizes), 4 rows of N(0, 3) inputs."""
    torch.manual_seed(0)
    layers = {'linear': torch.nn.Linear(512, 2048),
              'qkv': concatenated(MultiHeadedAttention(8, 512).linears[:3])}
    x = 3 * torch.randn(4, 512)
    errors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            want, got = layer(x), Int8Linear(layer, weight_bits)(x)
            errors[name] = ((got - want).norm() / want.norm()).item()
    return errors


def kernel_facts():
    return {'saturates': int8_kernel_saturates(), 'bits': int8_weight_bits(), 'line': int8_kernel()}


@pytest.mark.parametrize('kernel', ['this CPU', 'AVX2'])
def test_int8_layers_are_within_3_percent_of_fp32(kernel):
    errors = relative_errors() if kernel == 'this CPU' else in_avx2_process('t.relative_errors()')
    assert max(errors.values()) < BOUND, errors


def test_the_avx2_kernel_saturates_8_bit_weights_and_gets_7():
    """The bound catches a saturating kernel (8-bit weights on the AVX2 kernel), and the AVX2 kernel is found
    out and given 7-bit weights."""
    facts = in_avx2_process('t.kernel_facts()')
    assert facts['saturates'] and facts['bits'] == 7, facts
    assert '7-bit weights' in facts['line'] and 'FBGEMM_ENABLE_INSTRUCTIONS=AVX2' in facts['line']
    assert in_avx2_process('t.relative_errors(8)')['linear'] > BOUND


def test_the_kernel_found_agrees_with_the_cpu_flags():
    """VNNI (avx512_vnni) multiplies into int32: 8-bit weights; AVX2 without any VNNI saturates: 7-bit."""
    flags = cpu_flags()
    if os.environ.get('FBGEMM_ENABLE_INSTRUCTIONS') or not flags:
        pytest.skip('FBGEMM_ENABLE_INSTRUCTIONS is set, or /proc/cpuinfo cannot be read')
    if 'avx512_vnni' in flags:
        assert not int8_kernel_saturates() and int8_weight_bits() == 8 and '8-bit weights' in int8_kernel()
    elif 'avx2' in flags and not flags & {'avx_vnni', 'avx512_vnni'}:
        assert int8_kernel_saturates() and int8_weight_bits() == 7 and '7-bit weights' in int8_kernel()
    else:
        pytest.skip('a CPU with neither avx512_vnni nor plain avx2')


def test_int8_linear_is_no_worse_than_torch_ao():
    """torch.ao's dynamically quantized Linear keeps 7 bits of the activations on x86; ours is no less exact."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want, got = layer(x), Int8Linear(layer)(x)
        ao = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear},
                                                    dtype=torch.qint8)(x)
    assert got.shape == want.shape == (3, 5, 48)
    err, ao_err = (got - want).abs().max(), (ao - want).abs().max()
    assert 0 < err < 0.02 * want.abs().max() and err <= ao_err * 1.1, (err, ao_err)


def tiny_model():
    torch.manual_seed(0)
    return tiny_sat(vocab_size=15, K=2, d_model=16, d_ff=24, num_layers=2, att_feat_size=6).eval()


def tiny_batch():
    return masked_batch((4, 2, 6, 1), 8, 6, generator=torch.Generator().manual_seed(1))


def logprob_gap():
    """Largest |int8 - fp32| log-probability over the vocabulary when both models are teacher-forced on the fp32
    model's greedy captions (the same tokens, so a flipped argmax cannot hide or fake an error)."""
    model, (att, masks) = tiny_model(), tiny_batch()
    int8 = quantize_int8(model)
    with torch.no_grad():
        seq = model(None, att, masks, opt={'beam_size': 1}, mode='sample')[0]
        labels = torch.cat([seq.new_zeros(seq.size(0), 1), seq, seq.new_zeros(seq.size(0), 1)], 1)
        want, got = model(None, att, labels, masks), int8(None, att, labels, masks)
    assert got.shape == want.shape and torch.isfinite(got).all()
    return (got - want).abs().max().item()


@pytest.mark.parametrize('kernel', ['this CPU', 'AVX2'])
def test_int8_model_scores_words_like_fp32(kernel):
    gap = logprob_gap() if kernel == 'this CPU' else in_avx2_process('t.logprob_gap()')
    assert gap < 0.15, gap  # d_model 16: 0.04 with 8-bit weights, 0.08 with 7-bit; a saturating kernel ~1.06


def test_int8_model_is_a_copy_and_copies_pack_their_own_weights():
    model, (att, masks) = tiny_model(), tiny_batch()
    q = quantize_int8(model)
    assert type(model.model.generator.proj) is torch.nn.Linear  # the original is untouched
    assert {type(m) for m in q.modules()} >= {Int8Linear} and not any(type(m) is torch.nn.Linear for m in q.modules())
    with torch.no_grad():
        got = q(None, att, masks, opt={'beam_size': 1}, mode='sample')[1]
        got_copy = copy.deepcopy(q)(None, att, masks, opt={'beam_size': 1}, mode='sample')[1]
    assert torch.equal(got_copy, got)


def test_int8_without_fbgemm_falls_back_to_torch_ao(monkeypatch):
    """Where torch has no fbgemm (e.g. ARM builds), --quantize int8 is torch.ao's dynamic quantization."""
    import models.accel.speed
    monkeypatch.setattr(models.accel.speed, 'fbgemm_int8_available', lambda: False)
    model, (att, masks) = tiny_model(), tiny_batch()
    q = quantize_int8(model)
    assert type(q.model.generator.proj).__module__.startswith('torch.ao.nn.quantized')
    with torch.no_grad():
        want = model(None, att, masks, opt={'beam_size': 1}, mode='sample')[1]
        got = q(None, att, masks, opt={'beam_size': 1}, mode='sample')[1]
    assert got.shape == want.shape and (got - want).abs().max() < 0.05


# ---- through eval.py ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained_checkpoint(tiny_dataset, tmp_path_factory):
    """A tiny SAT (K=2) checkpoint trained for 80 XE steps on the tiny dataset: (model.pth, infos_tiny.pkl)."""
    return tiny_checkpoint(tiny_dataset, tmp_path_factory.mktemp('ckpt_int8'), train_steps=80)


def eval_argv(checkpoint, run_id):
    return ['--model', checkpoint[0], '--infos_path', checkpoint[1], '--language_eval', '0', '--split', 'train',
            '--batch_size', '4', '--id', run_id, '--device', 'cpu']


def captions_of(path):
    with open(path) as f:
        return [p['caption'] for p in json.load(f)]


def test_quantize_int8_eval_end_to_end(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """eval.py --quantize int8 decodes with Int8Linear layers, says which kernel, and captions as fp32 does, on
    this CPU's kernel and on the AVX2 kernel."""
    import eval as eval_script
    monkeypatch.chdir(tmp_path)
    assert eval_script.main(eval_argv(trained_checkpoint, 'fp32')) == 0
    assert 'int8:' not in capsys.readouterr().out
    assert eval_script.main(eval_argv(trained_checkpoint, 'int8') + ['--quantize', 'int8']) == 0
    assert f'with {int8_weight_bits()}-bit weights' in capsys.readouterr().out
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'eval.py')] +
                          eval_argv(trained_checkpoint, 'avx2') + ['--quantize', 'int8'],
                          env=dict(os.environ, **AVX2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 'int8: fbgemm with 7-bit weights' in done.stdout
    fp32 = captions_of('vis/fp32.json')
    assert len(fp32) == 10
    for run_id in ('int8', 'avx2'):
        int8 = captions_of(f'vis/{run_id}.json')
        same = sum(a == b for a, b in zip(fp32, int8))
        assert len(int8) == 10 and same >= 7, (run_id, fp32, int8)  # rounding may flip a few close argmaxes


def test_quantize_refuses_unknown_values(trained_checkpoint, tmp_path, monkeypatch, capsys):
    import eval as eval_script
    monkeypatch.chdir(tmp_path)
    assert eval_script.main(eval_argv(trained_checkpoint, 'q') + ['--quantize', 'int4']) == 2
    assert '--quantize' in capsys.readouterr().err
