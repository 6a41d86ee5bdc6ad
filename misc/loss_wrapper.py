"""The training loss as a module around the model: XE (or label smoothing) or self-critical, one call."""
import torch
from torch import nn

from misc.losses import build_criterion


class LossWrapper(nn.Module):
    """forward(batch, sc_flag) -> {'loss': scalar, 'reward': mean sample reward (self-critical only)}."""

    def __init__(self, model, opt):
        super().__init__()
        self.model = model
        self.crit = build_criterion(opt.label_smoothing)
        self.seq_per_img = opt.seq_per_img
        self.encode_per_image = getattr(opt, 'encode_per_image', 0)
        self.cached_tokens = opt.cached_tokens
        self.cider_reward_weight = getattr(opt, 'cider_reward_weight', 1.0)
        self._reward = None  # built on first self-critical use: XE runs need no document frequencies

    def load_reward(self):
        """The CIDEr-D reward with the --cached_tokens document frequencies (read once, on first use)."""
        if self._reward is None:
            from misc.rewards import SelfCriticalReward
            self._reward = SelfCriticalReward(self.cached_tokens, cider_weight=self.cider_reward_weight)
        return self._reward

    def forward(self, batch, sc_flag=False):
        fc, att, att_masks = batch['fc_feats'], batch['att_feats'], batch['att_masks']
        # The batch holds each image seq_per_img times in a row: encode it once with --encode_per_image 1 (ours)
        # and let the model repeat the encoder output; 0 (default) encodes every copy, as the reference.
        per_img = self.seq_per_img if self.encode_per_image and att.size(0) % self.seq_per_img == 0 else 1
        att = att[::per_img]  # (S / per_img, N, F)
        att_masks = None if att_masks is None else att_masks[::per_img]
        if not sc_flag:
            labels, masks = batch['labels'], batch['masks']
            logprobs = self.model(fc, att, labels, att_masks, seq_per_img=per_img)  # (S, L-1, V)
            return {'loss': self.crit(logprobs, labels[:, 1:], masks[:, 1:])}
        from misc.rewards import self_critical_loss
        # One multinomial sample per row, in train mode (dropout on), as the reference.
        seq, logprobs = self.model(fc, att, att_masks, opt={'sample_max': 0, 'seq_per_img': per_img},
                                   mode='sample')  # (S, T) each
        image_ids = [info['id'] for info in batch['infos']] if batch.get('infos') else None
        advantage, rewards = self.load_reward()(seq, batch['gts'], self.seq_per_img, image_ids)
        advantage = torch.as_tensor(advantage, dtype=logprobs.dtype, device=logprobs.device)
        loss = self_critical_loss(logprobs, seq, advantage)
        return {'loss': loss, 'reward': float(rewards.mean())}
