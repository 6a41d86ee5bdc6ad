"""Image files to the reference's grid features (docs/own_images.md): read with Pillow, ImageNet-normalised at full
size, through models.resnet's ResNet. Used by scripts/prepro_feats.py (features on disk), eval.py --image_folder
and the Captioner API (features in memory), so the three compute the same numbers.

As the reference's prepro_feats.py: pixels / 255, a grey image as three equal channels, an alpha channel dropped,
then (x - mean) / std per channel with ImageNet's mean and std; no resizing.
"""
import os

import numpy as np
import torch

from misc.errors import SaticError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a folder's files are taken as (the reference's dataloaderraw.py: jpg, png, jpeg, any case); others are
# reported and skipped.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
DEFAULT_CNN_FOLDER = os.path.join('data', 'imagenet_weights')


def default_cnn_weights(cnn_model):
    """data/imagenet_weights/<cnn_model>.pth, relative to the working directory (the reference's place)."""
    return os.path.join(DEFAULT_CNN_FOLDER, f'{cnn_model}.pth')


def read_image(path):
    """The normalised image of a file: float32 tensor (3, H, W); SaticError (one line) when it is not a readable
    image."""
    from PIL import Image, UnidentifiedImageError  # (only image paths pay for Pillow)
    try:
        with Image.open(path) as image:
            # 'L' -> three equal channels, 'RGBA' -> alpha dropped (not composited), palette/CMYK -> RGB
            pixels = np.asarray(image.convert('RGB'), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SaticError(f'{path}: not a readable image ({type(e).__name__}: {str(e)[:120]}); skip it or '
                         're-save it as JPEG/PNG') from None
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def folder_images(folder):
    """([image file paths], [other files]) under folder, recursively, sorted by relative path (hidden files and
    folders left out); SaticError when folder is not a folder."""
    if not os.path.isdir(folder):
        raise SaticError(f'--image_folder {folder}: not a folder; pass the folder that holds your images')
    images, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in sorted(files):
            if name.startswith('.'):
                continue
            path = os.path.join(root, name)
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    return sorted(images, key=lambda p: os.path.relpath(p, folder)), others


def coco_json_images(coco_json, folder):
    """[(image id, path)] of a COCO-style json ({'images': [{'id', 'file_name'}]}), paths under folder."""
    from misc.files.readers import read_json
    data = read_json(coco_json, '--coco_json')
    entries = data.get('images') if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and 'id' in e and 'file_name' in e
                                                for e in entries):
        raise SaticError(f"--coco_json {coco_json}: expected {{'images': [{{'id', 'file_name'}}, ...]}} (a COCO "
                         'annotation or image-info file)')
    return [(e['id'], os.path.join(folder, e['file_name'])) for e in entries]


@torch.no_grad()
def grid_features(extractor, images):
    """images: normalised (3, H, W) tensors -> [(fc (2048,), att (a, a, 2048))] float32 numpy, in order. Images of
    one size go through the network together (a batch); every image is computed at its full size."""
    device = next(extractor.parameters()).device
    out = [None] * len(images)
    by_size = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    for indices in by_size.values():
        batch = torch.stack([images[i] for i in indices]).to(device)  # (b, 3, H, W)
        fc, att = extractor(batch)  # (b, 2048), (b, a, a, 2048)
        fc, att = fc.float().cpu().numpy(), att.float().cpu().numpy()
        for row, i in enumerate(indices):
            out[i] = (fc[row], att[row])
    return out
