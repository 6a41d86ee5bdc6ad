"""--bf16, --fp16 and --tf32 (docs/speed.md, "Several GPUs"): bfloat16 autocast gives the same dtypes and numbers whatever
the region masks; --fp16's gradient scaler works with the non-finite guard (an overflow is skipped on every rank
and backs the scale off, without counting as a failure while the scale is >= 1) and resumes exactly; --tf32
switches TensorFloat-32 on CUDA only. CPU autocast stands in for CUDA's here; the CUDA test is marked cuda."""
import argparse
import types

import pytest
import torch

import models.transformer as transformer
import train
from misc.files.safe_load import load_pickle, load_torch
from misc.run.distributed import World
from tests.helpers import assert_one_line_error, run_main, targs, tiny_sat


# ----------------------------------------------------------------------------------------------- bf16
def test_bf16_encoder_dtypes_and_numbers_do_not_depend_on_the_masks(monkeypatch):
    """The residual streams keep one dtype (encoder: bfloat16 from att_embed's autocast linear; decoder: float32)
    with no mask, an all-ones mask and a padded batch; the memory of an unpadded batch is the same either way."""
    torch.manual_seed(0)
    model = tiny_sat(num_layers=2).eval()
    att = torch.randn(2, 4, 8)
    padded = torch.ones(2, 4)
    padded[1, 3] = 0
    seen, residual = [], transformer.SublayerConnection.residual
    monkeypatch.setattr(transformer.SublayerConnection, 'residual',
                        lambda self, x, y: seen.append((x.dtype, y.dtype)) or residual(self, x, y))
    labels = torch.randint(1, 12, (2, 18))
    dtypes, memories = [], []
    for masks in (None, torch.ones(2, 4), padded):
        seen.clear()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            memory, _ = model.encode(att, masks)
            model.decoder_states(att, labels, masks)
        dtypes.append(list(seen))
        memories.append(memory)
    assert dtypes[0] == dtypes[1] == dtypes[2]
    assert dtypes[0][0] == (torch.bfloat16, torch.bfloat16) and dtypes[0][-1][0] == torch.float32
    assert torch.equal(memories[0], memories[1])
    assert torch.equal(memories[2][0], memories[0][0])  # image 0 has all its regions in both batches


def test_bf16_and_fp16_exclude_each_other(tmp_path):
    assert_one_line_error(run_main(['--bf16', '1', '--fp16', '1'], tmp_path), '--bf16 and --fp16 exclude each other')


# ----------------------------------------------------------------------------------------------- fp16
class Scaled(torch.nn.Module):
    """A loss module whose loss is w * factor: its gradient overflows float32 once the loss scale is large enough."""

    def __init__(self, factor):
        super().__init__()
        self.w, self.factor = torch.nn.Parameter(torch.ones(())), factor

    def forward(self, batch, sc_flag):
        return {'loss': self.w * self.factor}


def test_fp16_overflow_is_skipped_and_backs_the_scale_off():
    config = train.StepConfig(bf16=0, fp16=1, grad_clip=0.1)
    batch = {'att_feats': torch.zeros(1)}
    loss_module = Scaled(1e3)
    optimizer = torch.optim.SGD(loss_module.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 120)  # 1e3 * 2^120 overflows float32
    stats = train.train_step(loss_module, optimizer, batch, False, config, scaler=scaler)
    assert stats['skipped'] and stats['overflow'] == 2.0 ** 120 and scaler.get_scale() == 2.0 ** 119
    assert loss_module.w.item() == 1.0
    scaler = torch.amp.GradScaler('cpu')  # 2^16: no overflow; unscaled, clamped (0.1) and applied
    stats = train.train_step(loss_module, optimizer, batch, False, config, scaler=scaler)
    assert not stats['skipped'] and 'overflow' not in stats and stats['loss'] == 1e3
    assert loss_module.w.item() == pytest.approx(1.0 - 0.5 * 0.1)


def test_an_overflow_counts_as_a_failure_only_below_scale_1(capsys):
    run = types.SimpleNamespace(world=World())
    state = types.SimpleNamespace(iteration=7, skipped=[])
    batch = {'infos': [{'id': 42}]}
    train.note_skipped(run, state, batch, {'overflow': 1024.0, 'rank_loss': 2.5, 'skipped': True})
    assert state.skipped == [] and 'fp16 gradient overflow at loss scale 1024' in capsys.readouterr().err
    train.note_skipped(run, state, batch, {'overflow': 0.5, 'rank_loss': 2.5, 'skipped': True})
    assert state.skipped == [7] and 'non-finite loss or gradient' in capsys.readouterr().err


@pytest.mark.parametrize('flag', ['--fp16', '--bf16'])
def test_half_precision_training_stops_and_resumes_bit_for_bit(tiny_dataset, tmp_path, flag):
    """--fp16 / --bf16 on the CPU (autocast; fp16 with a GradScaler, whose scale is saved in infos and restored):
    a stop at 6 + resume to 12 equals 12 straight (dropout on, self-critical from iteration 11; the reference layer
    norm runs in float32 under autocast, else a float16 zero row overflows)."""
    common = [flag, '1', '--save_checkpoint_every', '3', '--self_critical_after', '2']
    stopped, straight = tmp_path / 'stopped', tmp_path / 'straight'
    for folder, argv in ((stopped, ['--max_iters', '6']), (stopped, ['--max_iters', '12', '--start_from', stopped]),
                         (straight, ['--max_iters', '12'])):
        rc, _, err = run_main(targs(tiny_dataset, folder, *argv, *common), tmp_path)
        assert rc == 0, err
    a, b = (load_torch(str(folder / 'model.pth')) for folder in (stopped, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    infos = [load_pickle(str(folder / 'infos_run.pkl')) for folder in (stopped, straight)]
    if flag == '--fp16':
        assert infos[0]['grad_scaler'] == infos[1]['grad_scaler'] and infos[0]['grad_scaler']['scale'] > 0
    else:
        assert 'grad_scaler' not in infos[0]
    histories = [load_pickle(str(folder / 'histories_run.pkl')) for folder in (stopped, straight)]
    assert histories[0]['loss_history'] == histories[1]['loss_history']


# ----------------------------------------------------------------------------------------------- tf32
def test_tf32_is_a_cuda_switch_only(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    opt = argparse.Namespace(tf32=1, fp16=1)
    scaler = train.precision(opt, World())  # CPU: nothing global changes
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert isinstance(scaler, torch.amp.GradScaler)
    assert train.precision(argparse.Namespace(tf32=0, fp16=0), World()) is None


@pytest.mark.cuda
def test_tf32_flag_on_cuda():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        world = World(0, 1, torch.device('cuda'))
        train.precision(argparse.Namespace(tf32=1, fp16=0), world)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        train.precision(argparse.Namespace(tf32=0, fp16=0), world)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
