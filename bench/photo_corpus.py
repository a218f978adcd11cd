"""A photo library in miniature, made here (no download): the files a phone and the web produce.

    python bench/photo_corpus.py --out bench/photos     # writes the files, prints their sizes

12-MP JPEG with an EXIF rotation (stored standing, tag 6), 12-MP progressive JPEG, 12-MP HEIC with a
Display P3 profile, 12-MP AVIF, a 2560x1600 PNG (a laptop screenshot's size), a 1600x1200 WebP. The
content is tests/pictures.py's photo_like (smooth regions, sharp edges, fine lines, mild sensor noise);
HEIC and AVIF get less noise, which their encoders would otherwise spend minutes on at 12 MP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from PIL import Image  # noqa: E402

from runners.images import ORIENTATION, heif_plugin_error  # noqa: E402
from tests.pictures import TWELVE_MP, display_p3, encode, photo_like  # noqa: E402


def corpus(seed: int = 0) -> dict[str, bytes]:
    """name -> file bytes."""
    assert heif_plugin_error() is None, heif_plugin_error()  # registers pillow-heif's HEIF writer too
    photo = photo_like(*TWELVE_MP, seed=seed)
    smooth = photo_like(*TWELVE_MP, seed=seed, noise=1.0)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return {
        "jpeg-12mp-exif-rotated.jpg": encode(
            photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes()
        ),
        "jpeg-12mp-progressive.jpg": encode(photo, "JPEG", quality=90, progressive=True),
        "heic-12mp-display-p3.heic": encode(
            smooth, "HEIF", quality=60, icc_profile=display_p3(), enc_params={"preset": "ultrafast"}
        ),
        "avif-12mp.avif": encode(smooth, "AVIF", quality=60, speed=10),
        "png-2560x1600-screenshot.png": encode(photo_like(2560, 1600, seed=seed + 1, noise=0.5), "PNG"),
        "webp-1600x1200.webp": encode(photo_like(1600, 1200, seed=seed + 2), "WEBP", quality=85),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/photos")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in corpus().items():
        (out / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
