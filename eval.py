"""Evaluate a trained captioner on a split: captions, COCO metrics and decoding latency (README, "The COCO recipe").

  python eval.py --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl --batch_size 1 --beam_size 1
  python eval.py --model save/X/model-best.pth --image_folder my_pictures   (own images: docs/own_images.md)

Options not on the command line come from the checkpoint's infos; the vocabulary always does. Without
--infos_path, the infos saved beside --model are used (infos_X-best.pkl for model-best.pth), and --id and
--ref_json default to the run's own. Writes (relative to
the working directory, as the reference) vis/<id>.json ([{image_id, caption}]), with --language_eval 1
eval_results/<id>_<split>.json, with --seq_kd 1 every image's beams (vis/<id>_seq_kd.json), with --dump_images 1
the caption viewer vis/index.html. With --image_folder: no split and no metrics; vis/<id>.json
([{image_id, caption, file_path}]) and with --dump_images 1 vis/index.html with the pictures (caption_folder).
"""
import sys

from captioner import caption_folder, image_entries, image_output_folders, write_image_outputs  # noqa: F401
from evaluator import (check_attention_options, check_outputs, infos_path_of, load_checkpoint,  # noqa: F401
                       output_folders, run_evaluation, write_outputs)
from misc.console.cli import run_cli
from opts import check_eval_split, check_image_options, parse_eval_opt

def main(argv=None):
    def run(eval_opt):
        check_image_options(eval_opt)
        if eval_opt.image_folder:  # own images: no split, no references, no metrics
            check_outputs(image_output_folders(eval_opt))
            write_image_outputs(eval_opt, *caption_folder(eval_opt))
            return
        check_eval_split(eval_opt)
        check_attention_options(eval_opt)
        check_outputs(output_folders(eval_opt))
        write_outputs(eval_opt, *run_evaluation(eval_opt))
    return run_cli(parse_eval_opt, run, argv)


if __name__ == '__main__':
    sys.exit(main())
