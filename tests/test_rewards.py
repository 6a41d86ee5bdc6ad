"""misc/train/rewards.py: CIDEr-D rewards on token ids, the leave-one-out baseline and the self-critical loss."""
import argparse
import contextlib
import io

import numpy as np
import pytest
import torch

from misc.eval.cider_d import CiderD
from misc.errors import SaticError
from misc.train.loss_wrapper import LossConfig, LossWrapper
from misc.train.losses import self_critical_loss
from misc.train.rewards import SelfCriticalReward, ids_to_str
from tests.helpers import REWARD_GTS as GTS


def test_ids_to_str():
    assert ids_to_str([1, 5, 33, 0, 7, 0]) == '1 5 33 0'
    assert ids_to_str(np.array([0, 4])) == '0'
    # reference quirk: no end token when the row has no 0
    assert ids_to_str([1, 5, 33]) == '1 5 33'
    assert ids_to_str([1, 5, 33], end_token_always=True) == '1 5 33 0'


def test_rewards_are_cider_d_against_all_references(cached_tokens):
    reward = SelfCriticalReward(cached_tokens)
    seqs = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 2, 0, 0, 0, 0], [14, 14, 14, 14, 14, 14],
                         [8, 9, 10, 0, 0, 0], [9, 10, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0]])
    advantage, rewards = reward(seqs, GTS, seq_per_img=3)
    scorer = CiderD.from_cached_tokens(cached_tokens)
    hyps = [ids_to_str(row) for row in seqs.numpy()]
    refs = [[ids_to_str(row) for row in GTS[i // 3]] for i in range(6)]
    np.testing.assert_allclose(rewards, scorer.score(hyps, refs), rtol=0, atol=1e-12)
    assert rewards[0] > rewards[1] > 0 and rewards[2] == 0
    assert advantage.dtype == np.float32 and advantage.shape == (6,)
    # keyed by image id: the same numbers, from the cache the second time
    for _ in range(2):
        np.testing.assert_allclose(reward(seqs, GTS, 3, image_ids=[17, 42])[1], rewards, rtol=0, atol=1e-12)


def test_tokens_after_the_first_end_are_ignored(cached_tokens):
    reward = SelfCriticalReward(cached_tokens)
    clean = torch.tensor([[1, 2, 3, 0, 0, 0], [8, 9, 0, 0, 0, 0]])
    noisy = torch.tensor([[1, 2, 3, 0, 4, 7], [8, 9, 0, 10, 12, 0]])
    np.testing.assert_array_equal(reward(noisy, GTS, 1)[1], reward(clean, GTS, 1)[1])
    # label rows too
    gts_noisy = [g.copy() for g in GTS]
    gts_noisy[0][1, 4:6] = [9, 9]  # row [1, 2, 5, 0, 9, 9, ...]
    np.testing.assert_array_equal(reward(clean, gts_noisy, 1)[1], reward(clean, GTS, 1)[1])


def test_leave_one_out_baseline_by_hand(cached_tokens):
    reward = SelfCriticalReward(cached_tokens)
    reward.scorers['cider'].cider.score_groups = lambda hyps, rvs, sizes: np.array([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    advantage, rewards = reward(torch.zeros(6, 4, dtype=torch.long), GTS, seq_per_img=3)
    # image 0: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2; image 1: 0 - 3, 3 - 1.5, 3 - 1.5
    np.testing.assert_allclose(advantage, [-3.0, -1.5, 4.5, -3.0, 1.5, 1.5])
    np.testing.assert_allclose(rewards, [1.0, 2.0, 6.0, 0.0, 3.0, 3.0])


def test_single_sample_has_no_baseline(cached_tokens):
    reward = SelfCriticalReward(cached_tokens, weights={'cider': 0.5})
    seqs = torch.tensor([[1, 2, 3, 4, 0], [8, 9, 10, 0, 0]])
    advantage, rewards = reward(seqs, GTS, seq_per_img=1)
    np.testing.assert_allclose(advantage, rewards.astype(np.float32))
    assert (rewards > 0).all()


def test_missing_cached_tokens(tmp_path):
    with pytest.raises(SaticError, match='prepro_ngrams.py'):
        SelfCriticalReward(str(tmp_path / 'nothing'))


def test_self_critical_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    seqs = torch.tensor([[3, 0, 0], [4, 5, 0]])
    advantage = np.array([1.0, -2.0], dtype=np.float32)
    loss = self_critical_loss(logp, seqs, advantage)
    # mask [[1, 1, 0], [1, 1, 1]]: -((-1 - 2) * 1 + (-0.5 - 1.5 - 2.5) * -2) / 5 = -(-3 + 9) / 5
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[-0.2, -0.2, 0.0], [0.4, 0.4, 0.4]], rtol=1e-6)


# ---- the BLEU-4 part of the reward (--bleu_reward_weight) -------------------------------------------------------
SEQS = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 2, 5, 0, 0, 0], [6, 2, 3, 4, 9, 0],
                     [8, 9, 10, 0, 0, 0], [8, 11, 10, 12, 0, 0], [13, 0, 0, 0, 0, 0]])


def pycocoevalcap_bleu4(hyps, refs):
    """pycocoevalcap's Bleu(4) per-sentence BLEU-4, called directly as the reference's get_scores did."""
    from pycocoevalcap.bleu.bleu import Bleu
    with contextlib.redirect_stdout(io.StringIO()):
        _, scores = Bleu(4).compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    return np.array(scores[3])


def leave_one_out(rewards, S):
    per_image = rewards.reshape(-1, S)
    return (per_image - (per_image.sum(1, keepdims=True) - per_image) / (S - 1)).reshape(-1)


def test_bleu_weighted_reward_is_cider_plus_pycocoevalcap_bleu4(cached_tokens, capsys):
    hyps = [ids_to_str(row) for row in SEQS.numpy()]
    refs = [[ids_to_str(row) for row in GTS[i // 3]] for i in range(6)]
    bleu = pycocoevalcap_bleu4(hyps, refs)
    cider = CiderD.from_cached_tokens(cached_tokens).score(hyps, refs)
    assert bleu[0] == pytest.approx(1.0) and 0.05 < bleu[2] < 0.9 and bleu[5] < 1e-3  # a BLEU that can tell
    capsys.readouterr()
    advantage, rewards = SelfCriticalReward(cached_tokens, weights={'cider': 0.7, 'bleu': 0.3})(SEQS, GTS, 3)
    assert capsys.readouterr().out == ''  # pycocoevalcap's {'testlen': ..} and ratio lines are silenced
    np.testing.assert_allclose(rewards, 0.7 * cider + 0.3 * bleu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(advantage, leave_one_out(0.7 * cider + 0.3 * bleu, 3), rtol=0, atol=1e-6)
    # BLEU alone (CIDEr-D weight 0: not computed, as the reference)
    _, rewards = SelfCriticalReward(cached_tokens, weights={'cider': 0, 'bleu': 2.0})(SEQS, GTS, 3)
    np.testing.assert_allclose(rewards, 2.0 * bleu, rtol=0, atol=1e-12)


def test_bleu_is_not_computed_at_weight_0(cached_tokens, monkeypatch):
    import misc.train.rewards
    monkeypatch.setattr(misc.train.rewards, 'bleu_scores', lambda *a: pytest.fail('BLEU computed at weight 0'))
    _, rewards = SelfCriticalReward(cached_tokens, weights={'cider': 1.0, 'bleu': 0})(SEQS, GTS, 3)
    assert rewards.max() > 0


def test_loss_wrapper_passes_the_bleu_weight(cached_tokens):
    opt = argparse.Namespace(label_smoothing=0, seq_per_img=3, cached_tokens=cached_tokens, cider_reward_weight=0.5,
                             bleu_reward_weight=1.5)
    reward = LossWrapper(torch.nn.Linear(1, 1), LossConfig.from_opt(opt)).load_reward()
    assert {name: reward.weights[name] for name in ('cider', 'bleu')} == {'cider': 0.5, 'bleu': 1.5}
    assert all(w == 0 for name, w in reward.weights.items() if name not in ('cider', 'bleu'))  # at their defaults


# ---- the registry: a new reward is one class in misc/train/rewards.py ---------------------------------------------------
def test_a_registered_reward_is_an_option_a_loss_config_weight_and_a_part_of_the_reward(cached_tokens, monkeypatch):
    """A toy scorer added to misc.train.rewards.REWARDS (nothing else touched) gets its --toy_reward_weight option, rides
    in LossConfig.reward_weights and is added to the reward after the reference's parts, only at weight > 0."""
    import opts
    from misc.train import rewards

    class LengthReward(rewards.RewardScorer):  # the number of words before the end token
        name, default_weight, help = 'toy', 0, 'a toy reward: caption length'

        def scores(self, hyps, gts, seq_per_img, image_ids):
            return np.array([len(hyp.split()) - hyp.endswith(' 0') for hyp in hyps], dtype=np.float64)

    monkeypatch.setitem(rewards.REWARDS, 'toy', LengthReward)
    assert opts.parse_opt([]).toy_reward_weight == 0 and '--toy_reward_weight' in opts._train_parser().format_help()
    opt = opts.parse_opt(['--toy_reward_weight', '0.25', '--cider_reward_weight', '0', '--seq_per_img', '3',
                          '--cached_tokens', cached_tokens])
    config = LossConfig.from_opt(opt)
    assert config.reward_weights['toy'] == 0.25 and config.reward_weights['cider'] == 0  # (other rewards: their own)
    assert all(w == 0 for name, w in config.reward_weights.items() if name not in ('toy', 'cider'))
    reward = LossWrapper(torch.nn.Linear(1, 1), config).load_reward()
    _, got = reward(SEQS, GTS, 3)
    np.testing.assert_array_equal(got, 0.25 * np.array([4, 3, 5, 3, 4, 1], dtype=np.float64))
    # at its default weight 0 the toy is not called, and the reward is the reference's
    monkeypatch.setattr(LengthReward, 'scores', lambda *a: pytest.fail('computed at weight 0'))
    _, plain = SelfCriticalReward(cached_tokens)(SEQS, GTS, 3)
    np.testing.assert_array_equal(plain, SelfCriticalReward(cached_tokens, weights={'cider': 1})(SEQS, GTS, 3)[1])


def test_unknown_reward_names_are_refused(cached_tokens):
    with pytest.raises(ValueError, match='unknown reward'):
        SelfCriticalReward(cached_tokens, weights={'cidr': 1})
