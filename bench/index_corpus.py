"""Photo-like pictures for the indexing pipeline's tests and benchmark: a sky-to-ground gradient, a few
shapes with hard edges, soft shading and a little sensor noise, different for every seed (not random
noise, which no camera makes), with the EXIF a camera writes (capture date, optionally a description).

    python bench/index_corpus.py OUT_DIR --count 300        # the benchmark's folder
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

EXIF_IFD, DATE_TIME_ORIGINAL, IMAGE_DESCRIPTION, MAKE, MODEL = 0x8769, 0x9003, 0x010E, 0x010F, 0x0110


def photo(seed: int, width: int = 4032, height: int = 3024) -> Image.Image:
    """A landscape-like RGB picture: drawn at a quarter of the size and scaled up (smooth), noise at full size."""
    rng = np.random.default_rng(seed)
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, small_h)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(small_w, axis=1)
    canvas = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, small_w)), int(rng.integers(0, small_h))
        x1, y1 = (
            x0 + int(rng.integers(small_w // 10, small_w // 2)),
            y0 + int(rng.integers(small_h // 10, small_h // 2)),
        )
        colour = tuple(int(value) for value in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.5)).resize((width, height), Image.Resampling.BILINEAR)
    # Sensor noise, +-6 levels: a tile of grain repeated over the picture, added in Pillow (C), not numpy.
    side = min(509, width, height)
    grain = Image.fromarray(rng.integers(0, 13, (side, side), dtype=np.uint8)).convert("RGB")
    noise = Image.new("RGB", (width, height))
    for top in range(0, height, side):
        for left in range(0, width, side):
            noise.paste(grain, (left, top))
    return ImageChops.add(canvas, noise, offset=-6)


def camera_exif(taken_at: str, description: str | None = None) -> Image.Exif:
    """`taken_at` as EXIF writes it ("2024:07:14 18:30:05")."""
    exif = Image.Exif()
    exif[MAKE], exif[MODEL] = "Generated", "Photo 1"  # (Pillow writes the Exif IFD only under a non-empty IFD0)
    exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = taken_at
    if description:
        exif[IMAGE_DESCRIPTION] = description
    return exif


def jpeg(image: Image.Image, exif: Image.Exif | None = None, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, exif=exif or Image.Exif())
    return buffer.getvalue()


def heic(image: Image.Image, exif: Image.Exif | None = None) -> bytes:
    """HEIC as an iPhone writes it (x265's fastest preset: the default one takes a minute for a 12-MP picture)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    image.save(
        buffer, format="HEIF", quality=70, exif=(exif or Image.Exif()).tobytes(), enc_params={"preset": "ultrafast"}
    )
    return buffer.getvalue()


def corpus(folder: Path, count: int) -> list[Path]:
    """`count` photos in camera-like sub-folders: 12-MP JPEGs, a few 2-MP ones and PNG screenshots."""
    paths = []
    for index in range(count):
        sub = folder / f"{2020 + index % 5}" / f"{index % 12 + 1:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        exif = camera_exif(f"{2020 + index % 5}:{index % 12 + 1:02d}:{index % 28 + 1:02d} 12:{index % 60:02d}:00")
        if index % 10 == 9:
            path = sub / f"Screenshot_{index:04d}.png"
            photo(index, 2560, 1600).save(path, format="PNG", compress_level=6)
        elif index % 10 == 8:
            path = sub / f"IMG_{index:04d}.jpg"
            path.write_bytes(jpeg(photo(index, 1600, 1200), exif))
        else:
            path = sub / f"IMG_{index:04d}.jpg"
            path.write_bytes(jpeg(photo(index), exif))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    paths = corpus(args.folder, args.count)
    total = sum(path.stat().st_size for path in paths)
    print(f"{len(paths)} photos, {total / 1e6:.0f} MB in {args.folder}")


if __name__ == "__main__":
    main()
