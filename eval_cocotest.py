"""Caption the COCO online test images and write the server's result file (README, "The COCO recipe").

  python eval_cocotest.py --input_json data/cocotest.json --input_fc_dir data/cocotest/cocotest_bu_fc
      --input_att_dir data/cocotest/cocotest_bu_att --input_label_h5 data/cocotalk_label.h5 --num_images -1
      --language_eval 0 --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl
      --batch_size 32 --beam_size 3 --id captions_test2014_alg_results

eval.py with language_eval 0: writes vis/<id>.json, one {"image_id": int, "caption": str} per test image, ready to
zip and upload. The test images have no captions: the label file is never read (whatever --input_label_h5 names,
e.g. the training labels of other images; 'none' works too).
"""
import sys

from misc.console.cli import run_cli
from opts import check_eval_split, parse_eval_opt


def parse_args(argv=None):
    eval_opt = parse_eval_opt(argv, beam_size=3, batch_size=2, language_eval=0,
                              description='Caption the COCO test images for the evaluation server.')
    eval_opt.language_eval = 0  # no references exist for the test images
    eval_opt.input_label_h5 = 'none'
    return eval_opt


def run(eval_opt):
    from evaluator import check_outputs, run_evaluation, write_server_results  # (torch: --help stays light)
    check_eval_split(eval_opt)
    check_outputs([('vis', 'vis/ (the result file)')])  # before any loading or decoding
    opt, result, _, _ = run_evaluation(eval_opt)
    write_server_results(result.predictions, opt.id)  # the run's own id unless --id


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
