"""Caption agreement and COCO metrics of --quantize int8 and --bf16 1 against fp32, on trained demo checkpoints.

Runs this tree's eval.py (the demo's protocol: test split, batch size 1, greedy, language_eval 1) three times per
checkpoint, in a scratch working directory, and compares vis/<id>.json captions and eval_results/<id>_test.json.
Needs the demo data and Java (METEOR). fp32 runs with SATIC_BF16=0 (fp32 even on a CPU with AMX), bf16 with
--bf16 1 (the decoder's weights cast to bfloat16 once per model: models/accel/bf16.py). Merges {"demo_precision": {...}} into bench/results.json.

    python bench/demo_precision.py --save_dir save --data_dir data/demo \
        --runs demo-nsc-transformer-baseline,demo-nsc-sat-2-from-nsc-seqkd [--modes int8,bf16]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import machine, merge_results, other_load  # noqa: E402

MODES = {'fp32': [], 'int8': ['--quantize', 'int8'], 'bf16': ['--bf16', '1']}
METRICS = ('Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--save_dir', default='save', help='folder of the demo runs (save/<run>/model-best.pth)')
    parser.add_argument('--data_dir', default='data/demo')
    parser.add_argument('--runs', default='demo-nsc-transformer-baseline,demo-nsc-sat-2-from-nsc-seqkd')
    parser.add_argument('--modes', default='int8,bf16', help='compared with fp32: int8 and/or bf16')
    args = parser.parse_args(argv)
    modes = {mode: MODES[mode] for mode in ['fp32'] + [m for m in args.modes.split(',') if m and m != 'fp32']}
    save_dir, data = os.path.abspath(args.save_dir), os.path.abspath(args.data_dir)
    results = {'machine': machine(), 'busy_at_start': other_load(), 'runs': {}}
    with tempfile.TemporaryDirectory(prefix='satic-precision-') as work:
        for run in filter(None, args.runs.split(',')):
            captions, scores, timing = {}, {}, {}
            for mode, flags in modes.items():
                eval_id = f'{run}-{mode}'
                argv_ = [sys.executable, os.path.join(ROOT, 'eval.py'),
                         '--model', f'{save_dir}/{run}/model-best.pth',
                         '--infos_path', f'{save_dir}/{run}/infos_{run}-best.pkl',
                         '--input_json', f'{data}/cocotalk.json', '--input_fc_dir', f'{data}/cocobu_fc',
                         '--input_att_dir', f'{data}/cocobu_att', '--ref_json', f'{data}/captions_demo.json',
                         '--input_label_h5', f'{data}/cocotalk_label.h5', '--split', 'test', '--batch_size', '1',
                         '--beam_size', '1', '--language_eval', '1', '--id', eval_id, '--device', 'cpu',
                         '--timing_json', f'{eval_id}_timing.json', *flags]
                # fp32 stays fp32 on a CPU with AMX too (eval.py would pick bf16 by itself: models/accel/bf16.py)
                env = dict(os.environ, SATIC_BF16='1' if mode == 'bf16' else '0')
                subprocess.run(argv_, cwd=work, check=True, stdout=subprocess.DEVNULL, env=env)
                with open(os.path.join(work, 'vis', f'{eval_id}.json')) as f:
                    captions[mode] = [p['caption'] for p in json.load(f)]
                with open(os.path.join(work, 'eval_results', f'{eval_id}_test.json')) as f:
                    overall = json.load(f)['overall']
                scores[mode] = {k: overall[k] for k in METRICS}
                with open(os.path.join(work, f'{eval_id}_timing.json')) as f:
                    timing[mode] = json.load(f)['ms_per_image']
            row = {'scores': scores, 'ms_per_image': timing, 'images': len(captions['fp32'])}
            for mode in list(modes)[1:]:
                same = sum(a == b for a, b in zip(captions['fp32'], captions[mode]))
                row[f'{mode}_identical'] = same
                print(f"{run} {mode}: identical captions {same}/{len(captions[mode])}; " + ', '.join(
                    f"{k} {scores['fp32'][k]:.3f} -> {scores[mode][k]:.3f}" for k in METRICS))
            results['runs'][run] = row
    results['busy_at_end'] = other_load()
    merge_results('demo_precision', results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
