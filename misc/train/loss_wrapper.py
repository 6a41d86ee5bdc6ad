"""The training loss as a module around the model: XE (or label smoothing, plus word-level distillation) or
self-critical, one call."""
import torch
from torch import nn

from misc.options.configs import LossConfig  # (declared with its options; misc.train.loss_wrapper.LossConfig too)
from misc.train.losses import build_criterion, self_critical_loss
from misc.train.rewards import SelfCriticalReward, default_reward_weights, reward_option


class LossWrapper(nn.Module):
    """forward(batch, sc_flag) -> {'loss': scalar, 'reward': mean sample reward (self-critical only),
    'kd_loss': the KL part, before its weight (XE with a teacher only)}."""

    def __init__(self, model, config, teacher=None):
        """config: a LossConfig (train.py builds it once, at the edge); teacher: the frozen model of --kd_weight
        (misc.train.teacher.load_teacher) or None."""
        super().__init__()
        if not isinstance(config, LossConfig):
            raise TypeError(f'LossWrapper takes a LossConfig (LossConfig.from_opt(options)), not {type(config).__name__}')
        opt = config
        self.model = model
        self.crit = build_criterion(opt.label_smoothing)
        self.seq_per_img = opt.seq_per_img
        self.encode_per_image = opt.encode_per_image
        self.cached_tokens = opt.cached_tokens
        self.reward_weights = dict(opt.reward_weights)
        self._reward = None  # built on first self-critical use: XE runs need no document frequencies
        self.kd_weight = opt.kd_weight or 0
        self.teacher_eval_mode = bool(opt.teacher_eval_mode)
        # Not registered as a submodule (object.__setattr__): the teacher stays out of state_dict(), parameters()
        # (optimiser, gradient clamp, DDP) and checkpoints; _apply below still moves it with .to()/.cuda().
        object.__setattr__(self, 'teacher', teacher)
        self.kd_crit = nn.KLDivLoss(reduction='batchmean', log_target=True)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def kd_loss(self, logprobs, att, labels, att_masks, masks, rows_per_image):
        """KL(teacher || student) over the positions of masks[:, 1:]: nn.KLDivLoss(log_target=True, 'batchmean')
        on the (positions, V) rows, i.e. summed over the vocabulary and averaged over the masked positions.
        logprobs (positions, V): the student's rows (SATModel.scored_logprobs); the teacher computes the same rows.

        reference quirk (--teacher_eval_mode 0): the teacher runs in train mode, dropout on, because the reference
        called teacher.eval() and then .train() on the loss wrapper that contained it."""
        self.teacher.train(self.training and not self.teacher_eval_mode)
        with torch.no_grad():
            teacher_logprobs, _ = self.teacher.scored_logprobs(att, labels, att_masks, masks,
                                                               seq_per_img=rows_per_image)
        return self.kd_crit(logprobs, teacher_logprobs.to(logprobs.dtype))  # (positions, V) each

    def load_reward(self):
        """The self-critical reward (misc.train.rewards: CIDEr-D with the --cached_tokens document frequencies, and the
        other registered parts) at the configured weights (built once, on first use)."""
        if self._reward is None:
            self._reward = SelfCriticalReward(self.cached_tokens, weights=self.reward_weights)
        return self._reward

    def features(self, batch, sc_flag):
        """(fc, att, att_masks, rows_per_image) for the model: with --encode_per_image 1 (ours) one row per image,
        encoded once, the model repeating its memory per caption (rows_per_image = seq_per_img); with 0 (default, the
        reference) one row per caption, each encoded with its own dropout (rows_per_image = 1).

        The batch holds the features once per image (DataLoader; repeated here, on the batch's device) or once per
        caption (the reference's layout, e.g. dataloader.repeat_per_caption): att_feats (B or B*S, N, F)."""
        fc, att, att_masks = batch['fc_feats'], batch['att_feats'], batch['att_masks']
        S = self.seq_per_img
        captions = batch['labels'].size(0) if not sc_flag else len(batch['gts']) * S
        if att.size(0) == captions:  # once per caption
            if not (self.encode_per_image and captions % S == 0):
                return fc, att, att_masks, 1
            return fc, att[::S], None if att_masks is None else att_masks[::S], S  # (B, N, F)
        if self.encode_per_image:
            return fc, att, att_masks, S
        repeat = lambda t: None if t is None else t.repeat_interleave(S, dim=0)  # noqa: E731
        return repeat(fc), repeat(att), repeat(att_masks), 1  # (B*S, ...): repeated on the device, after the copy

    def forward(self, batch, sc_flag=False):
        fc, att, att_masks, rows_per_image = self.features(batch, sc_flag)
        if not sc_flag:
            labels, masks = batch['labels'], batch['masks']
            # The generator and the log-softmax run only at the M scored positions (masks[:, 1:] > 0): (M, V), (M,).
            logprobs, targets = self.model.scored_logprobs(att, labels, att_masks, masks,
                                                           seq_per_img=rows_per_image)
            loss = self.crit.scored(logprobs, targets)
            if self.kd_weight > 0 and self.teacher is not None:  # word-level distillation (XE stage only)
                kd = self.kd_loss(logprobs, att, labels, att_masks, masks, rows_per_image)
                return {'loss': loss + self.kd_weight * kd, 'kd_loss': kd.detach()}
            return {'loss': loss}
        # One multinomial sample per row, in train mode (dropout on), as the reference.
        seq, logprobs = self.model(fc, att, att_masks, opt={'sample_max': 0, 'seq_per_img': rows_per_image},
                                   mode='sample')  # (S, T) each
        image_ids = [info['id'] for info in batch['infos']] if batch.get('infos') else None
        advantage, rewards = self.load_reward()(seq, batch['gts'], self.seq_per_img, image_ids)
        advantage = torch.as_tensor(advantage, dtype=logprobs.dtype, device=logprobs.device)
        loss = self_critical_loss(logprobs, seq, advantage)
        return {'loss': loss, 'reward': float(rewards.mean())}
