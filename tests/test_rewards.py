"""misc/rewards.py: CIDEr-D rewards on token ids, the leave-one-out baseline and the self-critical loss."""
import pickle

import numpy as np
import pytest
import torch

from misc.cider_d import CiderD, ngram_counts
from misc.errors import SaticError
from misc.losses import self_critical_loss
from misc.rewards import SelfCriticalReward, ids_to_str
from tests.helpers import REWARD_GTS as GTS, label_rows




@pytest.fixture
def cached_tokens(tmp_path):
    """Train document frequencies in prepro_ngrams' format, from a few made-up images."""
    train = GTS + [label_rows([[1, 5, 9], [2, 3, 14]]), label_rows([[4, 4, 4, 1], [7, 8]])]
    df = {}
    for rows in train:
        for g in set(g for row in rows for g in ngram_counts(ids_to_str(row, end_token_always=True))):
            df[g] = df.get(g, 0.0) + 1.0
    path = tmp_path / 'train-idxs.p'
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': len(train)}, f, protocol=2)
    return str(tmp_path / 'train-idxs')


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
    reward.cider.score_groups = lambda hyps, rvs, sizes: np.array([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    advantage, rewards = reward(torch.zeros(6, 4, dtype=torch.long), GTS, seq_per_img=3)
    # image 0: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2; image 1: 0 - 3, 3 - 1.5, 3 - 1.5
    np.testing.assert_allclose(advantage, [-3.0, -1.5, 4.5, -3.0, 1.5, 1.5])
    np.testing.assert_allclose(rewards, [1.0, 2.0, 6.0, 0.0, 3.0, 3.0])


def test_single_sample_has_no_baseline(cached_tokens):
    reward = SelfCriticalReward(cached_tokens, cider_weight=0.5)
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
