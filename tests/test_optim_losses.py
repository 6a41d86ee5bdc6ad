"""misc/train/optim.py and misc/train/losses.py: the schedules and losses of the reference, checked by hand."""
import argparse
import math

import torch

from misc.train import optim
from misc.options.configs import OptimConfig
from misc.train.losses import LabelSmoothing, LanguageModelCriterion


def test_noam_rate_formula_and_peak():
    d, warmup = 512, 4000
    assert math.isclose(optim.noam_rate(1, d, 1, warmup), d ** -0.5 * warmup ** -1.5)
    assert math.isclose(optim.noam_rate(warmup, d, 1, warmup), d ** -0.5 * warmup ** -0.5)
    assert math.isclose(optim.noam_rate(4 * warmup, d, 2, warmup), 2 * d ** -0.5 * (4 * warmup) ** -0.5)
    rates = [optim.noam_rate(s, d, 1, warmup) for s in range(1, 3 * warmup)]
    assert max(range(len(rates)), key=rates.__getitem__) + 1 == warmup


def test_noam_opt_sets_lr_each_step_and_saves_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = optim.NoamOpt([p], d_model=64, factor=1, warmup=10)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert math.isclose(opt.param_groups[0]['lr'], optim.noam_rate(3, 64, 1, 10))
    assert opt.optimizer.defaults['betas'] == (0.9, 0.98) and opt.optimizer.defaults['eps'] == 1e-9
    state = opt.state_dict()
    assert state['_step'] == 3
    fresh = optim.NoamOpt([torch.nn.Parameter(torch.zeros(3))], 64, 1, 10)
    fresh.load_state_dict(state)
    assert fresh._step == 3


def test_step_decay_matches_reference_rule():
    opt = argparse.Namespace(learning_rate=1.0, learning_rate_decay_start=0, learning_rate_decay_every=3,
                             learning_rate_decay_rate=0.5)
    assert [optim.step_decay_rate(e, OptimConfig.from_opt(opt)) for e in range(8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    opt.learning_rate_decay_start = -1
    assert optim.step_decay_rate(10, OptimConfig.from_opt(opt)) == 1.0


def test_gradient_clamp_is_elementwise():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.5, -0.05, -3.0])
    optim.clamp_gradients([p], 0.1)
    assert torch.equal(p.grad, torch.tensor([0.1, -0.05, -0.1]))  # a norm clip would keep the direction


def test_plateau_halves_after_patience():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = optim.PlateauOpt(torch.optim.Adam([p], lr=1.0))
    for loss in [1.0, 1.0, 1.0, 1.0]:
        opt.scheduler_step(loss)
    assert opt.param_groups[0]['lr'] == 1.0
    opt.scheduler_step(1.0)
    assert opt.param_groups[0]['lr'] == 0.5


def test_language_model_criterion_by_hand():
    logprobs = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    target = torch.tensor([[1, 1, 0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    loss = LanguageModelCriterion()(logprobs, target, mask)
    assert math.isclose(float(loss), -math.log(0.25), rel_tol=1e-6)  # only the first position counts


def test_label_smoothing_by_hand():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(2, 4, 6), -1)
    target = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    e, V = 0.2, 6
    expected, count = 0.0, 0
    for i in range(2):
        for t in range(4):
            if mask[i, t]:
                q = torch.full((V,), e / (V - 1))
                q[target[i, t]] = 1 - e
                expected += float((q * (q.log() - logprobs[i, t])).sum())
                count += 1
    assert math.isclose(float(LabelSmoothing(e)(logprobs, target, mask)), expected / count, rel_tol=1e-5)
    assert torch.isclose(LabelSmoothing(0.0)(logprobs, target, mask), LanguageModelCriterion()(logprobs, target, mask))
