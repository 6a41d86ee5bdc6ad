"""torchrun --nproc_per_node 2 (gloo, CPU): DistributedDataParallel averages gradients over ranks, train.py trains
with it, every rank keeps the same weights, and only rank 0 writes checkpoints (sharded validation:
tests/test_ddp_validation.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from misc.files.safe_load import load_pickle

REPO = Path(__file__).resolve().parents[1]

# Run on each rank: (1) one batch through the bare LossWrapper and through DDP, (2) train.main on the same launch,
# counting checkpoint saves and summing the final weights. Results go to <out>/rank<r>.json.
RANK_SCRIPT = '''
import gc, json, os, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
import opts
import train
from dataloader import DataConfig, DataLoader
from misc.run import checkpoint
from misc.train.loss_wrapper import LossConfig, LossWrapper

out, argv = sys.argv[1], sys.argv[2:]
opt = opts.parse_opt(argv)
world = train.setup_distributed(opt.device, opt.dist_timeout_minutes)
rank, world_size, device = world.rank, world.size, world.device
with DataLoader(DataConfig.from_opt(opt), rank=rank, world_size=world_size) as loader:
    opt.vocab_size = loader.vocab_size
    batch = loader.get_batch('train')
torch.manual_seed(0)
model = train.build_model(opt, device).eval()  # eval: no dropout, so a gradient depends on the batch alone
wrapper = LossWrapper(model, LossConfig.from_opt(opt))


def gradient():
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return grad


wrapper(batch)['loss'].backward()
local = gradient()
ddp = torch.nn.parallel.DistributedDataParallel(wrapper)  # (keep a reference: its reducer lives as long)
ddp(batch)['loss'].backward()
synced = gradient()
del ddp  # its reducer must go before train.main destroys the process group (else: terminate at exit)
gc.collect()
every = [torch.zeros_like(local) for _ in range(world_size)]
dist.all_gather(every, local)
result = {{'rank': rank, 'images': [info['id'] for info in batch['infos']],
           'ranks_differ': float((every[0] - every[1]).abs().max()),
           'synced_minus_mean': float((synced - torch.stack(every).mean(0)).abs().max())}}

saves, trained = [], []
save_checkpoint, build_model = checkpoint.save_checkpoint, train.build_model
checkpoint.save_checkpoint = lambda *a, **k: (saves.append(a[3]), save_checkpoint(*a, **k))[1]
train.build_model = lambda *a: trained.append(build_model(*a)) or trained[-1]
result['rc'] = train.main(argv)  # the process group made above is reused, then destroyed
result['saves'] = len(saves)
result['weights'] = [float(p.detach().double().sum()) for p in trained[0].parameters()]
with open(os.path.join(out, 'rank%d.json' % rank), 'w') as f:
    json.dump(result, f)
'''


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='torch.distributed/gloo missing')
def test_torchrun_two_ranks_average_gradients_and_rank0_saves(tiny_dataset, tmp_path):
    script = tmp_path / 'rank.py'
    script.write_text(RANK_SCRIPT.format(repo=str(REPO)))
    folder = tmp_path / 'ck'
    argv = ['--input_json', tiny_dataset.input_json, '--input_label_h5', tiny_dataset.label_h5,
            '--input_fc_dir', tiny_dataset.fc_dir, '--input_att_dir', tiny_dataset.att_dir,
            '--att_feat_size', str(tiny_dataset.feat_dim), '--fc_feat_size', str(tiny_dataset.feat_dim),
            '--caption_model', 'sat', '--K', '2', '--init_from', 'none', '--num_layers', '1',
            '--input_encoding_size', '16', '--rnn_size', '32', '--batch_size', '2', '--seq_per_img', '5',
            '--num_workers', '0', '--device', 'cpu', '--language_eval', '0', '--max_epochs', '-1',
            '--max_iters', '6', '--save_checkpoint_every', '3', '--losses_log_every', '1',
            '--checkpoint_path', str(folder), '--id', 'ddp']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(script), str(tmp_path), *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]

    # Each rank read its own shard, so the local gradients differ; DDP's are their mean on every rank.
    assert not set(ranks[0]['images']) & set(ranks[1]['images'])
    assert ranks[0]['ranks_differ'] > 1e-4
    assert all(r['synced_minus_mean'] < 1e-6 for r in ranks)

    # train.py under torchrun: both ranks finish, end with the same weights; rank 0 alone saves (at 3 and 6).
    assert [r['rc'] for r in ranks] == [0, 0]
    assert ranks[0]['weights'] == pytest.approx(ranks[1]['weights'], rel=1e-6, abs=1e-6)
    assert ranks[0]['saves'] == 2 and ranks[1]['saves'] == 0
    infos = load_pickle(str(folder / 'infos_ddp.pkl'))
    assert infos['iter'] == 6
    assert sorted(load_pickle(str(folder / 'histories_ddp.pkl'))['val_result_history']) == [3, 6]
    assert proc.stdout.count('iter 6 (epoch') == 1  # one progress line per iteration: rank 0's
