"""Optimisers and learning-rate schedules of the reference (README, "The COCO recipe").

- plain: Adam(optim_alpha, optim_beta, optim_epsilon) at --learning_rate, with optional step decay per epoch;
- --noamopt: Adam(0.9, 0.98, 1e-9) whose lr follows the Noam schedule, set before every step;
- --reduce_on_plateau: halve the lr when the validation loss stops improving (patience 3).
Gradient clipping is the reference's element-wise clamp, not norm clipping.
"""
import torch

from misc.errors import SaticError


def noam_rate(step, d_model, factor=1.0, warmup=2000):
    """lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), for step >= 1."""
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def step_decay_rate(epoch, config):
    """The reference's per-epoch step decay: lr * decay_rate ** ((epoch - start) // every) once epoch > start
    (config: misc.options.configs.OptimConfig)."""
    opt = config
    start = opt.learning_rate_decay_start
    if start >= 0 and epoch > start:
        return opt.learning_rate * opt.learning_rate_decay_rate ** ((epoch - start) // opt.learning_rate_decay_every)
    return opt.learning_rate


def build_optimizer(params, config):
    """The torch optimiser named by --optim, with the reference's hyper-parameter options (config:
    misc.options.configs.OptimConfig)."""
    opt = config
    name, lr, wd = opt.optim, opt.learning_rate, opt.weight_decay
    if name == 'adam':
        return torch.optim.Adam(params, lr, (opt.optim_alpha, opt.optim_beta), opt.optim_epsilon, weight_decay=wd)
    if name == 'adamw':
        return torch.optim.AdamW(params, lr, (opt.optim_alpha, opt.optim_beta), opt.optim_epsilon, weight_decay=wd)
    if name == 'rmsprop':
        return torch.optim.RMSprop(params, lr, opt.optim_alpha, opt.optim_epsilon, weight_decay=wd)
    if name == 'adagrad':
        return torch.optim.Adagrad(params, lr, weight_decay=wd)
    if name == 'sgd':
        return torch.optim.SGD(params, lr, weight_decay=wd)
    if name == 'sgdm':
        return torch.optim.SGD(params, lr, opt.optim_alpha, weight_decay=wd)
    if name == 'sgdmom':
        return torch.optim.SGD(params, lr, opt.optim_alpha, weight_decay=wd, nesterov=True)
    raise SaticError(f"--optim {name!r} is not one of adam, adamw, rmsprop, adagrad, sgd, sgdm, sgdmom")


class NoamOpt:
    """Adam(0.9, 0.98, 1e-9) whose lr is set by the Noam schedule before each step.

    state_dict() is the inner optimiser's plus '_step', as the reference writes optimizer.pth.
    """

    def __init__(self, params, d_model, factor=1.0, warmup=2000, step=0):
        """step: the updates already made (a resumed run: its iteration, as the reference; a saved state's
        '_step' overrides it)."""
        self.optimizer = torch.optim.Adam(params, lr=0, betas=(0.9, 0.98), eps=1e-9)
        self.d_model, self.factor, self.warmup = d_model, factor, warmup
        self._step = step

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def rate(self, step=None):
        return noam_rate(self._step if step is None else step, self.d_model, self.factor, self.warmup)

    def step(self):
        self._step += 1
        for group in self.optimizer.param_groups:
            group['lr'] = self.rate()
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state = self.optimizer.state_dict()
        state['_step'] = self._step
        return state

    def load_state_dict(self, state):
        state = dict(state)
        self._step = state.pop('_step', self._step)
        self.optimizer.load_state_dict(state)


class PlateauOpt:
    """An optimiser whose lr halves after `patience` validations without a lower loss (reference: patience 3)."""

    def __init__(self, optimizer, factor=0.5, patience=3):
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def scheduler_step(self, val_loss):
        self.scheduler.step(val_loss)

    def state_dict(self):
        return {'current_lr': self.param_groups[0]['lr'], 'scheduler_state_dict': self.scheduler.state_dict(),
                'optimizer_state_dict': self.optimizer.state_dict()}

    def load_state_dict(self, state):
        if 'optimizer_state_dict' not in state:  # a plain optimiser's state (e.g. from another stage)
            lr = get_lr(self.optimizer)
            self.optimizer.load_state_dict(state)
            set_lr(self.optimizer, lr)  # as the reference: the lr of the options, not the saved one
            return
        self.scheduler.load_state_dict(state['scheduler_state_dict'])
        self.optimizer.load_state_dict(state['optimizer_state_dict'])
        set_lr(self.optimizer, state['current_lr'])


def build(model, config, d_model, step=0):
    """The optimiser train.py uses, by the reference's rules (noamopt, then reduce_on_plateau, then --optim);
    config: misc.options.configs.OptimConfig; d_model: the model's (--input_encoding_size: Noam's scale); step: Noam's
    updates so far (a resumed run's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.noamopt:
        return NoamOpt(params, d_model, config.noamopt_factor, config.noamopt_warmup, step)
    optimizer = build_optimizer(params, config)
    if config.reduce_on_plateau:
        return PlateauOpt(optimizer)
    return optimizer


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def get_lr(optimizer):
    return optimizer.param_groups[0]['lr']


def clamp_gradients(parameters, grad_clip):
    """reference quirk: element-wise clamp of each gradient to [-grad_clip, grad_clip] (not norm clipping).
    Two fused multi-tensor kernels (the same values as a clamp_ per gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_clamp_min_(grads, -grad_clip)
        torch._foreach_clamp_max_(grads, grad_clip)
