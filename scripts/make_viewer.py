r"""One self-contained HTML page comparing caption runs side by side (docs/viewer.md).

  python scripts/make_viewer.py --runs vis/a.json,vis/b.json \
      --scores eval_results/a_test.json,eval_results/b_test.json \
      --ref_json data/demo/captions_demo.json --names baseline,SAT --output vis/compare.html

Per image: every run's caption, its per-image scores, the references; sort by a score of one run or by the difference
of two runs, filter by a word or by captions that repeat a word. Where a run saved attention ("attention" and
"boxes" in vis/<id>.json), hovering a word shows its strongest regions: boxes over the picture with --image_root,
bars over region numbers otherwise. The page needs no server or network: open it from disk. Its initial state can
be set in the URL: compare.html#sort=CIDEr&run=SAT&minus=baseline&order=desc&filter=dog&repeats=adjacent
&scope=SAT&select=<image_id>:<run>:<word index>.
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from misc.console.cli import run_cli
from misc.options.optspec import checked, one_of
from misc.viewer.viewer import write_viewer


def _list(text):
    return [x.strip() for x in text.split(',')] if text else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', required=True,
                   help="comma-separated caption files eval.py wrote (vis/<id>.json), one per run")
    p.add_argument('--scores', default='',
                   help="comma-separated eval_results/<id>_<split>.json, one per run in --runs order "
                        "('-' for a run without scores); default: none")
    p.add_argument('--names', default='', help='comma-separated run names for the page (default: the file names)')
    p.add_argument('--ref_json', default='', help='COCO-format references, e.g. data/demo/captions_demo.json')
    p.add_argument('--image_root', default='',
                   help="folder of the images: each one (file_path of vis/<id>.json, else of --images_json, else "
                        "file_name of --ref_json) is copied to imgs/ beside the page")
    p.add_argument('--images_json', default='', help='cocotalk.json: the file_path of each image id')
    p.add_argument('--link_images', type=int, default=0, help='1: symlink the images into imgs/ instead of copying')
    p.add_argument('--sort', default='',
                   help='initial sort: METRIC (of the last run), METRIC:RUN or METRIC:RUN-RUN with runs numbered '
                        'from 1 in --runs order (e.g. CIDEr:2-1), or id; default: CIDEr of the last scored run '
                        'minus the first')
    p.add_argument('--title', default='', help='page title (default: "Captions: <name> vs <name>")')
    p.add_argument('--output', default='vis/compare.html', help='the html file to write')
    return checked(p.parse_args(argv), link_images=one_of(0, 1))


def run(args):
    path, data = write_viewer(args.output, _list(args.runs), score_paths=_list(args.scores), names=_list(args.names),
                              ref_json=args.ref_json, image_root=args.image_root, images_json=args.images_json,
                              link_images=bool(args.link_images), title=args.title, sort=args.sort)
    with_img = sum(1 for im in data['images'] if im.get('img'))
    print(f"wrote the viewer of {len(data['runs'])} runs over {len(data['images'])} images to {path}"
          + (f' ({with_img} pictures in {os.path.join(os.path.dirname(path) or ".", "imgs")}/)' if with_img else '')
          + f': open file://{os.path.abspath(path)}')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
