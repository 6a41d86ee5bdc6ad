"""Caption the COCO online test images and write the server's result file (SPEC.md section 5).

  python eval_cocotest.py --input_json data/cocotest.json --input_fc_dir data/cocotest/cocotest_bu_fc
      --input_att_dir data/cocotest/cocotest_bu_att --input_label_h5 data/cocotalk_label.h5 --num_images -1
      --language_eval 0 --model save/X/model-best.pth --infos_path save/X/infos_X-best.pkl
      --batch_size 32 --beam_size 3 --id captions_test2014_alg_results

Writes vis/<id>.json: one {"image_id": int, "caption": str} per test image, ready to zip and upload.
The test images have no captions: the label file is not read (--input_label_h5 none works too).
"""
import os
import sys

import torch

from misc.errors import SaticError


def main(argv=None):
    from dataloader import DataLoader
    from misc.eval_utils import eval_split, load_model_for_eval, write_json_atomic
    from opts import parse_eval_opt
    eval_opt = parse_eval_opt(argv, beam_size=3, batch_size=2, language_eval=0,
                              description='Caption the COCO test images for the evaluation server.')
    try:
        torch.manual_seed(eval_opt.seed)
        model, opt, infos, device = load_model_for_eval(eval_opt)
        opt.input_label_h5 = 'none'  # test images have no references; the label file is never needed here
        opt.language_eval = 0
        loader = DataLoader(opt)
        loader.ix_to_word = infos['vocab']
        kwargs = dict(vars(opt), verbose=eval_opt.verbose, verbose_beam=eval_opt.verbose_beam)
        try:
            _, predictions, _, timing = eval_split(model, loader, kwargs, device=device)
        finally:
            loader.close()
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    results, seen = [], set()
    for p in predictions:  # the server wants each image once, with an integer id
        image_id = int(p['image_id'])
        if image_id not in seen:
            seen.add(image_id)
            results.append({'image_id': image_id, 'caption': p['caption']})
    path = os.path.join('vis', f'{eval_opt.id}.json')
    os.makedirs('vis', exist_ok=True)
    write_json_atomic(results, path)
    print(f"decoding: {timing['ms_per_image']:.2f} ms per image at batch size {timing['batch_size']}, "
          f"beam size {timing['beam_size']}")
    print(f'wrote {len(results)} captions to {path} (COCO server format)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
