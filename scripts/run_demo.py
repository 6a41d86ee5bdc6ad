"""The whole SATIC recipe of the original README on the embedded demo data, with a small model (make demo).

  1. autoregressive transformer baseline: XE with Noam, then self-critical (save/demo-nsc-transformer-baseline)
  2. sequence-level KD labels from it: eval.py --seq_kd 1 --split train --beam_size 5, prepro_labels_seqKD.py
  3. SAT K=2 stage 1 on those labels, initialised from the baseline (save/demo-sat-2-from-nsc-seqkd)
  4. save/copy_model.sh, then stage 2 self-critical (save/demo-nsc-sat-2-from-nsc-seqkd)
  5. eval.py at beam 1 and 3 for SAT and the baselines, eval_ensemble.py for the ensemble of the two K=1
     baselines (XE and self-critical) -> one table; eval_cocotest.py -> the server JSON;
     eval.py --dump_images 1 -> vis/index.html
  6. the reference's decoding options on SAT -> one table
  7. scripts/make_viewer.py -> vis/compare.html, the baseline's and SAT's captions side by side (docs/viewer.md)

Every command is printed before it runs, so each step can be re-run (or changed) by hand.
The demo features are synthetic: this demonstrates the pipeline, not image understanding.
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, log=None):
    """Run a command from the repository root, echoing it; stop the demo if it fails."""
    print('\n$ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    if log:
        with open(log, 'w') as f:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        with open(log) as f:
            tail = f.read().splitlines()[-4:]
        print('\n'.join('  ' + line for line in tail))
    else:
        proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f'demo: this step failed (exit {proc.returncode}){"; see " + log if log else ""}')
    print(f'  ({time.time() - start:.0f} s)', flush=True)


def feature_size(att_dir):
    first = sorted(glob.glob(os.path.join(att_dir, '*.npz')))[0]
    with np.load(first) as z:
        return int(z['feat'].shape[1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data_dir', default='data/demo')
    parser.add_argument('--num_layers', type=int, default=2)
    parser.add_argument('--d_model', type=int, default=128)
    parser.add_argument('--d_ff', type=int, default=512)
    parser.add_argument('--xe_epochs', type=int, default=4, help='baseline XE epochs')
    parser.add_argument('--sat_xe_epochs', type=int, default=3, help='SAT stage-1 epochs (from the baseline)')
    parser.add_argument('--sc_epochs', type=int, default=1, help='self-critical epochs of each model')
    parser.add_argument('--sc_learning_rate', type=float, default=1e-4)
    parser.add_argument('--batch_size', type=int, default=10)
    parser.add_argument('--K', type=int, default=2)
    parser.add_argument('--eval_only', action='store_true', help='only steps 5-6: evaluate the trained demo models')
    parser.add_argument('--options_only', action='store_true',
                        help='only step 6: the decoding options on the trained SAT model')
    return parser.parse_args(argv)


def data_options(d):
    return ['--input_json', f'{d}/cocotalk.json', '--input_fc_dir', f'{d}/cocobu_fc',
            '--input_att_dir', f'{d}/cocobu_att', '--cached_tokens', f'{d}/coco-train-idxs',
            '--ref_json', f'{d}/captions_demo.json']


def run_ids(args):
    """(base, nsc_base, sat, nsc_sat): the demo's four run ids."""
    return ('demo-transformer-baseline', 'demo-nsc-transformer-baseline', f'demo-sat-{args.K}-from-nsc-seqkd',
            f'demo-nsc-sat-{args.K}-from-nsc-seqkd')


def train_commands(args, att_size):
    """{stage: train.py's argv} of the demo's four training runs (baseline XE, baseline self-critical, SAT stage 1,
    SAT stage 2); att_size: the demo features' size. configs/demo_*.yml hold them at the default arguments
    (tests/test_cfg.py checks that they resolve to the same options)."""
    d = args.data_dir
    model = ['--num_layers', str(args.num_layers), '--input_encoding_size', str(args.d_model),
             '--rnn_size', str(args.d_ff), '--att_feat_size', str(att_size), '--fc_feat_size', str(att_size)]
    common = data_options(d) + model + ['--seq_per_img', '5', '--batch_size', str(args.batch_size),
                                        '--beam_size', '1', '--language_eval', '1', '--val_images_use', '250',
                                        '--save_checkpoint_every', '800', '--losses_log_every', '100']

    def xe(epochs):
        return ['--noamopt', '--noamopt_warmup', '1000', '--label_smoothing', '0.0', '--learning_rate', '5e-4',
                '--learning_rate_decay_start', '0', '--scheduled_sampling_start', '0', '--max_epochs', str(epochs)]

    def sc(after):
        return ['--learning_rate', str(args.sc_learning_rate), '--self_critical_after', str(after),
                '--max_epochs', str(after + args.sc_epochs)]
    base, nsc_base, sat, nsc_sat = run_ids(args)
    kd_h5 = f'{d}/cocotalk_seq-kd-from-nsc-transformer-baseline-b5'
    return {
        'transformer_xe': [*common, *xe(args.xe_epochs), '--caption_model', 'transformer', '--K', '1',
                           '--input_label_h5', f'{d}/cocotalk_label.h5', '--checkpoint_path', f'save/{base}',
                           '--id', base, '--overwrite_run', '1'],  # (the demo rebuilds its own folders)
        'transformer_sc': [*common, *sc(args.xe_epochs), '--caption_model', 'transformer', '--K', '1',
                           '--input_label_h5', f'{d}/cocotalk_label.h5', '--start_from', f'save/{nsc_base}',
                           '--checkpoint_path', f'save/{nsc_base}', '--id', nsc_base],
        'sat_xe': [*common, *xe(args.sat_xe_epochs), '--caption_model', 'sat', '--K', str(args.K),
                   '--init_from', f'save/{nsc_base}/model-best.pth', '--input_label_h5', f'{kd_h5}_label.h5',
                   '--checkpoint_path', f'save/{sat}', '--id', sat, '--overwrite_run', '1'],
        'sat_sc': [*common, *sc(args.sat_xe_epochs), '--caption_model', 'sat', '--K', str(args.K),
                   '--input_label_h5', f'{d}/cocotalk_label.h5', '--start_from', f'save/{nsc_sat}',
                   '--checkpoint_path', f'save/{nsc_sat}', '--id', nsc_sat],
    }


def main(argv=None):
    args = parse_args(argv)
    py = sys.executable
    d = args.data_dir
    os.makedirs('save/logs', exist_ok=True)
    data = data_options(d)
    base, nsc_base, sat, nsc_sat = run_ids(args)
    t0 = time.time()

    kd_json = f'vis/{nsc_base}_seq_kd.json'
    kd_h5 = f'{d}/cocotalk_seq-kd-from-nsc-transformer-baseline-b5'
    if args.options_only:
        return decoding_options_table(py, nsc_sat, data, d)
    if not args.eval_only:  # steps 1-4: training
        train = train_commands(args, feature_size(f'{d}/cocobu_att'))
        print('== 1. autoregressive baseline: XE, then self-critical')
        run([py, 'train.py', *train['transformer_xe']], log=f'save/logs/{base}.log')
        run(['bash', 'save/copy_model.sh', base, nsc_base])
        run([py, 'train.py', *train['transformer_sc']], log=f'save/logs/{nsc_base}.log')

        print('== 2. sequence-level KD labels from the baseline (beam 5 over the training images)')
        run([py, 'eval.py', '--model', f'save/{nsc_base}/model-best.pth',
             '--infos_path', f'save/{nsc_base}/infos_{nsc_base}-best.pkl', *data[:6],
             '--input_label_h5', f'{d}/cocotalk_label.h5', '--split', 'train', '--beam_size', '5', '--batch_size', '50',
             '--language_eval', '0', '--seq_kd', '1', '--seq_kd_path', kd_json, '--id', f'{nsc_base}-train-b5'],
            log=f'save/logs/{nsc_base}-seq-kd.log')
        run([py, 'scripts/prepro_labels_seqKD.py', '--input_json', f'{d}/dataset_coco.json',
             '--dict_json', f'{d}/cocotalk.json', '--teacher_json', kd_json, '--output_h5', kd_h5])

        print(f'== 3. SAT K={args.K}, stage 1: XE on the seq-KD labels, initialised from the baseline')
        run([py, 'train.py', *train['sat_xe']], log=f'save/logs/{sat}.log')

        print(f'== 4. SAT K={args.K}, stage 2: self-critical')
        run(['bash', 'save/copy_model.sh', sat, nsc_sat])
        run([py, 'train.py', *train['sat_sc']], log=f'save/logs/{nsc_sat}.log')

    print('== 5. evaluation on the demo test split (batch size 1); the ensemble of the two K=1 baselines (XE, then '
          'self-critical) against each of them')
    def checkpoint(run_id):
        return ['eval.py', '--model', f'save/{run_id}/model-best.pth',
                '--infos_path', f'save/{run_id}/infos_{run_id}-best.pkl']
    evaluations = ((nsc_base, nsc_base, 1, checkpoint(nsc_base)), (nsc_sat, nsc_sat, args.K, checkpoint(nsc_sat)),
                   (base, base, 1, checkpoint(base)),
                   (ENSEMBLE, 'demo-ensemble-baselines', 1, ['eval_ensemble.py', '--ids', base, nsc_base]))
    rows = []
    for run_id, name, k, command in evaluations:
        for beam in (1, 3):
            eval_id = f'{name}-b{beam}'
            run([py, *command, *data[:6], '--ref_json', f'{d}/captions_demo.json',
                 '--input_label_h5', f'{d}/cocotalk_label.h5', '--split', 'test', '--batch_size', '1',
                 '--beam_size', str(beam), '--language_eval', '1', '--id', eval_id,
                 '--timing_json', f'eval_results/{eval_id}_timing.json'], log=f'save/logs/eval-{eval_id}.log')
            with open(f'eval_results/{eval_id}_test.json') as f:
                overall = json.load(f)['overall']
            with open(f'eval_results/{eval_id}_timing.json') as f:
                ms = json.load(f)['ms_per_image']
            rows.append((run_id, k, beam, overall, ms))
    run([py, 'eval.py', '--model', f'save/{nsc_sat}/model-best.pth', '--infos_path', f'save/{nsc_sat}/infos_{nsc_sat}-best.pkl',
         *data[:6], '--ref_json', f'{d}/captions_demo.json', '--input_label_h5', f'{d}/cocotalk_label.h5',
         '--split', 'test', '--batch_size', '50', '--beam_size', '1', '--language_eval', '1', '--dump_images', '1',
         '--id', f'{nsc_sat}-viewer'], log='save/logs/eval-viewer.log')
    run([py, 'eval_cocotest.py', '--input_json', f'{d}/cocotest.json', '--input_fc_dir', f'{d}/cocotest_bu_fc',
         '--input_att_dir', f'{d}/cocotest_bu_att', '--input_label_h5', 'none', '--num_images', '-1',
         '--language_eval', '0', '--model', f'save/{nsc_sat}/model-best.pth',
         '--infos_path', f'save/{nsc_sat}/infos_{nsc_sat}-best.pkl', '--batch_size', '32', '--beam_size', '3',
         '--id', 'captions_test2014_alg_results'], log='save/logs/eval-cocotest.log')

    print('\n== Results on the demo test split (synthetic features: a pipeline check, not image understanding)')
    header = f"{'model':<34} {'K':>2} {'beam':>4} {'BLEU-4':>7} {'METEOR':>7} {'ROUGE-L':>8} {'CIDEr':>7} {'ms/img':>7}"
    print(header)
    print('-' * len(header))
    for run_id, k, beam, o, ms in rows:
        print(f"{run_id:<34} {k:>2} {beam:>4} {o['Bleu_4']:>7.3f} {o['METEOR']:>7.3f} {o['ROUGE_L']:>8.3f} "
              f"{o['CIDEr']:>7.3f} {ms:>7.2f}")
    cider = {(r[0], r[2]): r[3]['CIDEr'] for r in rows}
    for beam in (1, 3):
        print(f'ensemble of the K=1 baselines at beam {beam}: test CIDEr {cider[ENSEMBLE, beam]:.3f} against '
              f'{cider[base, beam]:.3f} ({base}) and {cider[nsc_base, beam]:.3f} ({nsc_base})')
    print(f'\nArtefacts:\n  checkpoints: save/{nsc_base}, save/{sat}, save/{nsc_sat} (TensorBoard: tensorboard --logdir save)'
          f'\n  training logs: save/logs/\n  seq-KD labels: {kd_h5}_label.h5 (from {kd_json})'
          f'\n  captions: vis/<id>.json; metrics: eval_results/<id>_test.json'
          f'\n  caption viewers: vis/index.html, vis/compare.html (baseline vs SAT, after step 6)\n  COCO server file: vis/captions_test2014_alg_results.json'
          f'\n  total time: {(time.time() - t0) / 60:.1f} min')
    with open('eval_results/demo_table.json', 'w') as f:
        json.dump([{'model': r[0], 'K': r[1], 'beam': r[2], **r[3], 'ms_per_image': r[4]} for r in rows], f, indent=1)
    status = decoding_options_table(py, nsc_sat, data, d)
    for run_id in (nsc_base, nsc_sat):  # greedy again, with each word's 5 strongest regions and the boxes
        run([py, *checkpoint(run_id), *data[:6], '--ref_json', f'{d}/captions_demo.json',
             '--input_label_h5', f'{d}/cocotalk_label.h5', '--split', 'test', '--batch_size', '50',
             '--beam_size', '1', '--language_eval', '1', '--dump_attention', '5', '--input_box_dir', f'{d}/cocobu_box',
             '--id', f'{run_id}-attention'], log=f'save/logs/eval-{run_id}-attention.log')
    comparison_viewer(py, f'{nsc_base}-attention', f'{nsc_sat}-attention', f'{d}/captions_demo.json', args.K)
    return status


# The table's name for the ensemble (eval_ensemble.py --ids) of the XE baseline and its self-critical continuation.
ENSEMBLE = 'ensemble of the 2 K=1 baselines'


# Step 6: what the reference's decoding options do to SAT (docs/reproducibility.md, "Decoding options and the reference").
DECODING_OPTIONS = (('greedy', []), ('greedy, decoding_constraint', ['--decoding_constraint', '1']),
                    ('greedy, block_trigrams', ['--block_trigrams', '1']),
                    ('greedy, remove_bad_endings', ['--remove_bad_endings', '1']),
                    ('beam 3', ['--beam_size', '3']),
                    ('beam 3, decoding_constraint', ['--beam_size', '3', '--decoding_constraint', '1']),
                    ('diverse beam 4, 2 groups, lambda 0.5', ['--beam_size', '4', '--group_size', '2']))


def repeated_word_rate(captions):
    """Share of captions with the same word twice in a row (SAT's best-known failure)."""
    words = [c.split() for c in captions]
    return sum(any(a == b for a, b in zip(w, w[1:])) for w in words) / max(len(words), 1)


def decoding_options_table(py, run_id, data, d):
    print(f'\n== 6. decoding options on {run_id} (demo test split, batch size 50)')
    results = []
    for name, flags in DECODING_OPTIONS:
        eval_id = f"{run_id}-{name.replace(' ', '').replace(',', '-')}"
        run([py, 'eval.py', '--model', f'save/{run_id}/model-best.pth',
             '--infos_path', f'save/{run_id}/infos_{run_id}-best.pkl', *data[:6], '--ref_json', f'{d}/captions_demo.json',
             '--input_label_h5', f'{d}/cocotalk_label.h5', '--split', 'test', '--batch_size', '50',
             '--language_eval', '1', '--id', eval_id, *flags], log=f'save/logs/eval-{eval_id}.log')
        with open(f'eval_results/{eval_id}_test.json') as f:
            cider = json.load(f)['overall']['CIDEr']
        with open(f'vis/{eval_id}.json') as f:
            captions = [p['caption'] for p in json.load(f)]
        results.append({'decoding': name, 'CIDEr': cider, 'repeated_word_rate': repeated_word_rate(captions),
                        'mean_words': float(np.mean([len(c.split()) for c in captions]))})
    print(f"{'decoding':<40} {'CIDEr':>7} {'repeats':>8} {'words':>6}")
    for r in results:
        print(f"{r['decoding']:<40} {r['CIDEr']:>7.3f} {r['repeated_word_rate']:>8.1%} {r['mean_words']:>6.1f}")
    with open('eval_results/demo_decoding_options.json', 'w') as f:
        json.dump(results, f, indent=1)
    return 0


def comparison_viewer(py, base_eval, sat_eval, ref_json, k, vis_dir='vis', results_dir='eval_results',
                      output='vis/compare.html'):
    """Step 7: one page with the baseline's and SAT's greedy captions of the demo test split side by side
    (vis/<id>.json with each word's strongest regions, eval_results/<id>_test.json), sorted by SAT's CIDEr minus
    the baseline's; returns its path."""
    print(f'\n== 7. caption viewer: the baseline and SAT K={k} side by side (demo test split, greedy)')
    run([py, 'scripts/make_viewer.py', '--runs', f'{vis_dir}/{base_eval}.json,{vis_dir}/{sat_eval}.json',
         '--scores', f'{results_dir}/{base_eval}_test.json,{results_dir}/{sat_eval}_test.json',
         '--names', f'baseline,SAT K={k}', '--ref_json', ref_json, '--sort', 'CIDEr:2-1',
         '--title', f'Demo test split: the baseline vs SAT K={k} (greedy)', '--output', output])
    return output


if __name__ == '__main__':
    sys.exit(main())
