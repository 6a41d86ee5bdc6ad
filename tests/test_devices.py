"""Device discipline on a CPU-only CI: a tensor created on the wrong device fails here, not first on a GPU.

Two checks (docs/speed.md, "Several GPUs"):
1. The meta device (shapes and devices, no data), for what needs no data: the losses (XE, label smoothing, their
   scored forms, self-critical, the distillation KL), teacher forcing and the encoder without region masks, and a
   backward through them. What cannot run on meta, because it reads data: the packing of masked regions and of the
   scored positions (nonzero: data-dependent shapes), the decoding loops' early stop and beam bookkeeping (host
   reads), the CIDEr-D reward (host numpy), the non-finite guard's .tolist.
2. Those too, on real data on the CPU with meta as the DEFAULT device: every tensor created without device= lands
   on meta and fails where it meets the data (as one created on the CPU would meet CUDA data). Covered: a whole
   training step (XE and self-critical, through train.train_step), decoding (greedy, sampling, beam, diverse beam,
   the constraints; cached and not) and evaluation. The model's dropout is set to 0 there: its fast CPU mask
   (models.accel.kernels.dropout, used only for CPU tensors) is created on the default device by design.
And: one host synchronisation per training step, counted.
"""
import argparse
import dataclasses
import json
import traceback

import pytest
import torch

import opts
import train
from dataloader import DataConfig, DataLoader
from misc.train import optim
from misc.eval.evaluation import evaluate
from misc.options.configs import OptimConfig
from misc.train.loss_wrapper import LossConfig, LossWrapper
from misc.train.losses import LabelSmoothing, LanguageModelCriterion, self_critical_loss
from models.decode_config import DecodeConfig
from tests.helpers import setup_model, tiny_sat

META = torch.device('meta')


def run_opt(ds, **overrides):
    opt = ds.opt(caption_model='sat', K=2, init_from='none', num_layers=1, input_encoding_size=16, rnn_size=32,
                 batch_size=3, **overrides)
    opt.K = opts.model_k(opt)
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        return argparse.Namespace(**{**vars(opt), 'vocab_size': loader.vocab_size, 'seq_length': loader.seq_length})


def without_dropout(model):
    for module in model.modules():
        if isinstance(getattr(module, 'p', None), float):
            module.p = 0.0
    return model


# ----------------------------------------------------------------------------------------------- 1. meta tensors
def test_losses_on_meta():
    logprobs = torch.randn(4, 7, 11, device=META, requires_grad=True)  # (S, T, V)
    target = torch.zeros(4, 9, dtype=torch.long, device=META)
    mask = torch.ones(4, 9, device=META)
    for crit in (LanguageModelCriterion(), LabelSmoothing(0.1)):
        loss = crit(logprobs, target, mask)
        assert loss.device == META and loss.shape == ()
        loss.backward()
        scored = crit.scored(logprobs.reshape(-1, 11), target[:, :7].reshape(-1))
        assert scored.device == META and scored.shape == ()
    seq = torch.zeros(4, 7, dtype=torch.long, device=META)
    sc = self_critical_loss(logprobs[..., 0], seq, torch.zeros(4, device=META))
    assert sc.device == META and sc.shape == ()
    kl = torch.nn.KLDivLoss(reduction='batchmean', log_target=True)(logprobs[0], logprobs[1].detach())
    assert kl.device == META


def test_teacher_forcing_and_encoder_on_meta():
    model = tiny_sat().to(META)
    att = torch.randn(3, 4, 8, device=META)
    memory, mask = model.encode(att)
    assert memory.device == META and memory.shape == (3, 4, 16) and mask is None
    labels = torch.zeros(6, 18, dtype=torch.long, device=META)
    for per_img, rows in ((1, att.repeat_interleave(2, 0)), (2, att)):
        logprobs = model(None, rows, labels, None, seq_per_img=per_img)
        assert logprobs.device == META and logprobs.shape == (6, 17, 13)
    LanguageModelCriterion()(logprobs, labels[:, 1:], torch.ones(6, 17, device=META)).backward()
    assert all(p.grad is None or p.grad.device == META for p in model.parameters())


# ----------------------------------------------------------------------------------------------- 2. meta as default
def on_default_meta(fn):
    """fn() with meta as the default device; a failure names the line of ours that created the stray tensor."""
    try:
        with torch.device('meta'):
            return fn()
    except (RuntimeError, NotImplementedError) as e:
        ours = [f'{f.filename}:{f.lineno}' for f in traceback.extract_tb(e.__traceback__)
                if '/site-packages/' not in f.filename and 'test_devices' not in f.filename]
        pytest.fail(f'a tensor on the wrong device ({str(e).splitlines()[0]}), from {ours[-3:]}')


@pytest.fixture
def trained_pieces(tiny_dataset):
    """(options, loader batch, LossWrapper, optimiser with its state created) for the tiny dataset, dropout 0."""
    opt = run_opt(tiny_dataset)
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        batch = loader.get_batch('train')
    torch.manual_seed(0)
    model = without_dropout(setup_model(opt))
    wrapper = LossWrapper(model, LossConfig.from_opt(opt))
    optimizer = optim.build(model, OptimConfig.from_opt(opt), opt.input_encoding_size)
    # torch's Adam makes its step counters on the default device by design: created here, outside
    train.train_step(wrapper, optimizer, batch, False, train.StepConfig.from_opt(opt))
    return opt, batch, wrapper, optimizer


@pytest.mark.parametrize('sc_flag', [False, True], ids=['xe', 'self-critical'])
def test_train_step_creates_nothing_on_the_default_device(trained_pieces, sc_flag):
    opt, batch, wrapper, optimizer = trained_pieces
    before = [p.detach().clone() for p in wrapper.parameters()]
    stats = on_default_meta(lambda: train.train_step(wrapper, optimizer, batch, sc_flag,
                                                       train.StepConfig.from_opt(opt)))
    assert not stats['skipped'] and ('reward' in stats) == sc_flag
    assert any(not torch.equal(a, p) for a, p in zip(before, wrapper.parameters()))
    assert all(p.device.type == 'cpu' for p in wrapper.parameters())


@pytest.mark.parametrize('config', [
    DecodeConfig(), DecodeConfig(sample_max=False), DecodeConfig(beam_size=3), DecodeConfig(beam_size=4, group_size=2),
    DecodeConfig(decoding_constraint=True, block_trigrams=True), DecodeConfig(use_cache=False),
    DecodeConfig(beam_size=3, use_cache=False), DecodeConfig(sample_max=False, use_cache=False)],
    ids=['greedy', 'sampling', 'beam', 'diverse-beam', 'constraints', 'greedy-uncached', 'beam-uncached',
         'sampling-uncached'])
def test_decoding_creates_nothing_on_the_default_device(trained_pieces, config):
    _, batch, wrapper, _ = trained_pieces
    model = wrapper.model.eval()
    assert batch['att_masks'] is not None  # the packed (masked) path too
    seq, logprobs = on_default_meta(lambda: model.decode(batch['att_feats'], batch['att_masks'], config))
    assert seq.device.type == logprobs.device.type == 'cpu' and seq.shape[0] == batch['att_feats'].shape[0]


def test_evaluation_creates_nothing_on_the_default_device(tiny_dataset, trained_pieces):
    opt, _, wrapper, _ = trained_pieces
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        result = on_default_meta(lambda: evaluate(wrapper.model, loader, 'val', DecodeConfig(), crit=wrapper.crit,
                                                  batch_size=1, shard=(1, 2)))
    assert result.positions == [1] and [start for start, _ in result.loss_parts] == [1]


# ----------------------------------------------------------------------------------------------- host reads
HOST_READS = ('item', 'tolist', 'cpu', 'nonzero', '__bool__', '__int__', '__float__')


def count_host_reads(monkeypatch, files):
    """A list that collects 'name file:line' for every Tensor host read (HOST_READS) called from `files`."""
    calls = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.endswith(files):
                calls.append(f'{_name} {caller.filename}:{caller.lineno}')
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def test_a_training_step_reads_the_host_once(trained_pieces, monkeypatch):
    """train_step's own host synchronisations: one .tolist (loss, reward, flags), whatever is logged."""
    opt, batch, wrapper, optimizer = trained_pieces
    calls = count_host_reads(monkeypatch, ('train.py', '/step.py', 'loss_wrapper.py', 'losses.py'))
    for sc_flag in (False, True):
        calls.clear()
        train.train_step(wrapper, optimizer, batch, sc_flag, train.StepConfig.from_opt(opt))
        assert len(calls) == 1 and calls[0].startswith('tolist'), calls


@pytest.mark.parametrize('config', [DecodeConfig(beam_size=3), DecodeConfig(beam_size=4, group_size=2),
                                    DecodeConfig(beam_size=3, decoding_constraint=True)],
                         ids=['beam', 'diverse-beam', 'beam-constraint'])
def test_beam_search_reads_the_host_once_per_step(trained_pieces, monkeypatch, config):
    """Finished beams stay on the device: one read per decoding step (may the search stop?) and one copy at the
    end, not one or more per word; the decoded beams are those of the model's own search."""
    _, batch, wrapper, _ = trained_pieces
    model = wrapper.model.eval()
    max_length = 9
    config = dataclasses.replace(config, max_length=max_length)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.decode(batch['att_feats'], batch['att_masks'], config)[0]
    calls = count_host_reads(monkeypatch, ('search.py', 'sat.py', 'decoding.py', 'cache.py'))
    with torch.no_grad():
        seq = model.decode(batch['att_feats'], batch['att_masks'], config)[0]
    steps = -(-max_length // model.K)
    reads = [c for c in calls if 'sat.py' not in c]  # sat.py: the encoder's one region count
    assert torch.equal(seq, expected)
    assert len(reads) <= (steps - 1) + config.group_size, reads  # the last group's stop question, the copies
    assert sum('.cpu' in c or c.startswith('cpu') for c in reads) == config.group_size, reads


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_pinned_batches_train_on_cuda(tiny_dataset):
    """On a GPU: pinned loader memory, asynchronous copies, a step in each precision (fp32, bf16, fp16 + scaler)."""
    opt = run_opt(tiny_dataset)
    device = torch.device('cuda')
    with DataLoader(DataConfig.from_opt(opt), pin_memory=True) as loader:
        batch = loader.get_batch('train')
    assert batch['att_feats'].is_pinned() and batch['fc_feats'] is None  # (no model reads fc features)
    batch = train.to_device(batch, device)
    for precision in ({}, {'bf16': 1}, {'fp16': 1}):
        run = argparse.Namespace(**{**vars(opt), **precision})
        torch.manual_seed(0)
        model = setup_model(run).to(device)
        wrapper = LossWrapper(model, LossConfig.from_opt(run))
        scaler = torch.amp.GradScaler('cuda') if run.fp16 else None
        stats = train.train_step(wrapper, optim.build(model, OptimConfig.from_opt(run), run.input_encoding_size), batch, False, train.StepConfig.from_opt(run),
                                 scaler=scaler)
        assert stats['loss'] > 0 and (not stats['skipped'] or 'overflow' in stats)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)])
def test_train_then_resume_self_critical_and_evaluate_on_cpu(tiny_dataset, tmp_path, device):
    """The README's two stages on `device` (stage 1 in --fp16, stage 2 self-critical in --bf16, resumed with
    --start_from), then eval.py on the CPU from the checkpoint that device wrote."""
    import eval as eval_script
    from misc.files.safe_load import load_pickle, load_torch
    from tests.helpers import run_main, targs
    folder = tmp_path / 'run'
    flags = ['--device', device, '--save_checkpoint_every', '4', '--val_images_use', '3']
    rc, out, err = run_main(targs(tiny_dataset, folder, *flags, '--fp16', '1', '--max_iters', '8'), tmp_path)
    assert rc == 0, err
    first = load_torch(str(folder / 'model.pth'))
    rc, out, err = run_main(targs(tiny_dataset, folder, *flags, '--bf16', '1', '--max_iters', '12',
                                  '--self_critical_after', '0', '--start_from', str(folder)), tmp_path)
    assert rc == 0, err
    infos = load_pickle(str(folder / 'infos_run.pkl'))
    assert infos['iter'] == 12
    last = load_torch(str(folder / 'model.pth'))
    assert all(t.device.type == 'cpu' for t in last.values())
    assert any(not torch.equal(first[k], last[k]) for k in first)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        rc = eval_script.main(['--model', str(folder / 'model.pth'), '--infos_path', str(folder / 'infos_run.pkl'),
                               '--device', 'cpu', '--language_eval', '0', '--split', 'test', '--batch_size', '2',
                               '--id', 'gpu-trained'])
    assert rc == 0
    assert len(json.loads((tmp_path / 'vis' / 'gpu-trained.json').read_text())) == 3
