"""misc/train/loss_wrapper.py with the loader's batches: features once per image (repeated on the device, here) give the
numbers of the reference's layout (repeated on the host), dropout draws included, for XE, self-critical and
--encode_per_image 1."""
import argparse

import pytest
import torch

import opts
from dataloader import DataConfig, DataLoader, repeat_per_caption
from misc.train.loss_wrapper import LossConfig, LossWrapper
from tests.helpers import setup_model


@pytest.mark.parametrize('sc_flag, encode_per_image', [(False, 0), (True, 0), (False, 1), (True, 1)])
def test_per_image_batches_give_the_numbers_of_per_caption_batches(tiny_dataset, sc_flag, encode_per_image):
    opt = tiny_dataset.opt(caption_model='sat', K=2, init_from='none', num_layers=1, input_encoding_size=16,
                           rnn_size=32, batch_size=3, encode_per_image=encode_per_image)
    opt.K = opts.model_k(opt)
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        batch = loader.get_batch('train')
        opt = argparse.Namespace(**{**vars(opt), 'vocab_size': loader.vocab_size, 'seq_length': loader.seq_length})
    assert batch['att_feats'].shape[0] == 3 and batch['labels'].shape[0] == 15
    torch.manual_seed(0)
    wrapper = LossWrapper(setup_model(opt).train(), LossConfig.from_opt(opt))  # dropout on
    results = []
    for layout in (batch, repeat_per_caption(batch)):
        torch.manual_seed(1)
        out = wrapper(layout, sc_flag)
        out['loss'].backward()
        grads = [p.grad.clone() for p in wrapper.parameters() if p.grad is not None]
        wrapper.zero_grad()
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a['loss'], b['loss']) and a.get('reward') == b.get('reward')
    assert len(grads_a) == len(grads_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
