"""A results page that needs nothing but a browser: thumbnails inside it as data: URIs, scores, captions.

Each card shows SigLIP's match probability for a search by words (what the model was trained to output:
the sigmoid of the cosine times its logit scale plus its bias), or the cosine of the two pictures for a
search by photo; the page says so above the cards. A photo stored under several paths (exact copies) is
one card that lists the other paths.

The page's one script marks each thumbnail once the browser has decoded it (`data-rendered`) and
counts them on <body> (`data-rendered="3/3"`): a thumbnail that failed is shown as a grey box with
the file name, and the count says so to a person or a test.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

from .index import register_heif
from .search import SearchHit

THUMBNAIL_PIXELS = 320

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
h1 { font-size: 1.2rem; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }
figure img { display: block; width: 100%; height: 240px; object-fit: cover; background: #ccc; }
figcaption { padding: 0.5rem 0.6rem; font-size: 0.85rem; line-height: 1.35; }
.rank { font-weight: 700; } .score { float: right; color: #555; font-variant-numeric: tabular-nums; }
.path { color: #777; font-size: 0.75rem; word-break: break-all; }
.copies { color: #777; font-size: 0.75rem; word-break: break-all; margin-top: 0.2rem; }
.legend { color: #444; font-size: 0.85rem; max-width: 60rem; line-height: 1.4; }
.missing { height: 240px; display: flex; align-items: center; justify-content: center; background: #ccc; }
"""

_SCRIPT = """
window.addEventListener("load", () => {
  const images = [...document.querySelectorAll("figure img")];
  let rendered = 0;
  for (const image of images) {
    const ok = image.complete && image.naturalWidth > 0;
    image.dataset.rendered = ok ? "yes" : "no";
    rendered += ok ? 1 : 0;
  }
  document.body.dataset.rendered = rendered + "/" + images.length;
});
"""


def thumbnail_data_uri(path: str | os.PathLike, pixels: int = THUMBNAIL_PIXELS) -> str | None:
    """The photo, upright and at most `pixels` on its long side, as a JPEG data: URI; None if unreadable."""
    from PIL import Image, ImageOps

    register_heif()
    try:
        with Image.open(path) as image:
            image.draft("RGB", (pixels, pixels))  # JPEG: decode at a reduced scale, much faster for 12 MP
            picture = ImageOps.exif_transpose(image).convert("RGB")
            picture.thumbnail((pixels, pixels))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=82)
    except Exception:  # gone, broken or in a format this machine cannot open: shown as a grey box
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


MATCH_LEGEND = (
    "<b>match</b>: how sure SigLIP2 is that the photo shows your words, as a probability: the model's own "
    "sigmoid of the cosine between the words' and the photo's vectors, times the model's logit scale plus its "
    "bias (the service's /health reports both). Above 50% the model says yes; a raw cosine (a good match is "
    "about 0.1-0.2) means nothing on its own."
)
SIMILARITY_LEGEND = (
    "<b>similarity</b>: the cosine of the two photos' SigLIP2 vectors: 1 is the same picture, a near-duplicate "
    "is above ~0.9, related scenes lie well below."
)
ORDER_LEGEND = (
    "The order: where photos have captions, the picture search and the caption search are merged by "
    "reciprocal-rank fusion (each photo scores the sum of 1/(60 + its rank) in the two lists); with a reranker, "
    "the captioned photos are reordered by its probability. Exact copies of a photo are one card."
)


def _card(hit: SearchHit) -> str:
    uri = thumbnail_data_uri(hit.path)
    name = html.escape(Path(hit.path).name)
    picture = f'<img src="{uri}" alt="{name}">' if uri else f'<div class="missing">{name}: no thumbnail</div>'
    caption = f"<div>{html.escape(hit.caption)}</div>" if hit.caption else ""
    if hit.match is not None:
        score = f"match {hit.match:.0%}"
    elif hit.image_score is not None:
        score = f"similarity {hit.image_score:.3f}"
    else:
        score = f"score {hit.score:.4f}"
    taken = f" · {html.escape(hit.taken_at[:10])}" if hit.taken_at else ""
    copies = ""
    if hit.copies:
        listed = ", ".join(html.escape(path) for path in hit.copies)
        copies = (
            f'<div class="copies">{len(hit.copies)} more {"copy" if len(hit.copies) == 1 else "copies"}: {listed}</div>'
        )
    return (
        f'<figure>{picture}<figcaption><span class="rank">#{hit.rank}{taken}</span>'
        f'<span class="score" title="ordered by {hit.score:.4f}">{score}</span>{caption}'
        f'<div class="path">{html.escape(hit.path)}</div>{copies}</figcaption></figure>'
    )


def render(hits: Sequence[SearchHit], title: str) -> str:
    by_words = any(hit.match is not None for hit in hits)
    legend = f'<p class="legend">{MATCH_LEGEND if by_words else SIMILARITY_LEGEND} {ORDER_LEGEND}</p>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{legend}\n"
        '<div class="grid">\n' + "\n".join(_card(hit) for hit in hits) + "\n</div>\n"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_html(hits: Sequence[SearchHit], path: str | os.PathLike, title: str) -> Path:
    """Write the results page; returns its path."""
    target = Path(path).expanduser()
    target.write_text(render(hits, title), encoding="utf-8")
    return target
