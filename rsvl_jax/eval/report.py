"""Pages and pictures you can look at: caption grids, search results and evaluation reports.

Everything here writes static files (HTML with relative links, JPEG thumbnails, PNG plots) into
one folder that can be copied anywhere and opened in a browser. Every page is a grid of
`.card` elements; a small script sets `data-images="ok"` (or `"broken"`),
`data-images-loaded` and `data-images-total` on `<body>` once the page has loaded, so a
headless browser (the tests) or a person can check that every picture is there.

* `caption_page`: your images with their captions (and beam alternatives with scores).
* `search_page`: a query and its ranked results.
* `retrieval_report`: the metric table, recall@K curves for both directions (`recall.png`) and,
  for a seeded sample of queries of each direction, the top-5 results with the correct ones
  marked, worst queries first; for PIR the query images carry VIR's belief scores drawn as a
  heatmap over the Swin token grid (`vir_heatmap`, from the model's own intermediates).
* `caption_report`: every image with its generated caption, its references and its CIDEr,
  worst first.
"""
from __future__ import annotations

import hashlib
import html
import math
import os
import pathlib
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 14px; }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; overflow-wrap: anywhere; }
.card img { max-width: 100%; display: block; margin: 0 auto 6px; image-rendering: auto; }
.card .caption { font-weight: 600; margin: 4px 0; }
.card .meta { color: #666; font-size: 0.85em; }
.card ol, .card ul { margin: 4px 0; padding-left: 1.4em; font-size: 0.9em; }
.row { display: flex; gap: 6px; align-items: flex-start; }
.row figure { margin: 0; flex: 1; text-align: center; font-size: 0.8em; }
.row figure img { border: 3px solid transparent; }
.hit img, img.hit { border-color: #2a9d2a !important; }
li.hit { color: #1d7a1d; font-weight: 600; }
.hit-mark { color: #1d7a1d; font-weight: 700; }
table.metrics { border-collapse: collapse; margin: 0.5em 0 1em; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.plot { max-width: 720px; width: 100%; }
"""

CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images', ok === imgs.length ? 'ok' : 'broken');
});
</script>"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------- files
def _atomic_write(path: pathlib.Path, data: bytes | str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    tmp.replace(path)
    return path


def thumb_name(*key) -> str:
    """A stable file name for the thumbnail of `key` (e.g. a path and a window)."""
    return hashlib.sha1(repr(key).encode()).hexdigest()[:20] + ".jpg"


def save_image(image: np.ndarray, path: str | os.PathLike, max_side: int = 256) -> pathlib.Path:
    """A uint8 (H, W, 3) image as a JPEG no larger than `max_side` (aspect kept)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(image, np.uint8))
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    if min(im.size) < 96:  # tiny inputs (64 px scenes): enlarge so the page shows them
        scale = 96 / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp")
    im.convert("RGB").save(tmp, format="JPEG", quality=88)
    tmp.replace(path)
    return path


def write_page(path: str | os.PathLike, title: str, body: str) -> pathlib.Path:
    """One self-contained HTML page (styles inline, images by relative path)."""
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head>\n<body data-images=\"pending\">\n<h1>{esc(title)}</h1>\n"
            f"{body}\n{CHECK_SCRIPT}\n</body></html>\n")
    return _atomic_write(pathlib.Path(path), page)


def _window_text(window) -> str:
    return "" if window is None else f"pixels x {window[0]}-{window[2]}, y {window[1]}-{window[3]}"


def metrics_table(metrics: Mapping[str, float], keys: Sequence[str] | None = None, fmt: str = ".2f") -> str:
    keys = [k for k in (keys or metrics) if k in metrics]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    row = "".join(f"<td>{format(float(metrics[k]), fmt)}</td>" for k in keys)
    return f"<table class=\"metrics\"><tr>{head}</tr><tr>{row}</tr></table>"


# ----------------------------------------------------------------------------- captions of a folder
def caption_page(path: str | os.PathLike, rows: Sequence[Mapping], title: str = "Captions",
                 summary: str = "") -> pathlib.Path:
    """A grid of thumbnails with their captions. Rows: `thumb` (path relative to the page),
    `path`, `caption`, optional `window`, `alternatives` [{caption, score}], `score`."""
    cards = []
    for r in rows:
        alts = r.get("alternatives") or []
        alt_html = ("<ol>" + "".join(f"<li>{esc(a['caption'])} <span class=\"meta\">({a['score']:.3f})</span></li>"
                                     for a in alts) + "</ol>") if alts else ""
        meta = esc(r["path"]) + (f"<br>{esc(_window_text(r.get('window')))}" if r.get("window") else "")
        cards.append(f"<div class=\"card\"><img src=\"{esc(r['thumb'])}\" alt=\"{esc(r['path'])}\">"
                     f"<div class=\"caption\">{esc(r['caption'])}</div>{alt_html}<div class=\"meta\">{meta}</div></div>")
    body = (f"<p>{esc(summary)}</p>" if summary else "") + f"<div class=\"grid\">{''.join(cards)}</div>"
    return write_page(path, title, body)


# ----------------------------------------------------------------------------- search results
def search_page(path: str | os.PathLike, query: str, results: Sequence[Mapping], *, query_thumb: str | None = None,
                title: str = "Search results") -> pathlib.Path:
    """A query and its ranked results. Image results: `thumb`, `path`, `score`, `window`;
    text results (an image-to-text query): `text`, `score`."""
    head = "<div class=\"card query\" style=\"max-width:340px\">"
    if query_thumb:
        head += f"<img src=\"{esc(query_thumb)}\" alt=\"query image\">"
    head += f"<div class=\"caption\">query: {esc(query)}</div></div>"
    cards = []
    for rank, r in enumerate(results, 1):
        if "thumb" in r:
            meta = esc(r["path"]) + (f"<br>{esc(_window_text(r.get('window')))}" if r.get("window") else "")
            cards.append(f"<div class=\"card\"><img src=\"{esc(r['thumb'])}\" alt=\"{esc(r['path'])}\">"
                         f"<div class=\"caption\">#{rank} &middot; {r['score']:.4f}</div><div class=\"meta\">{meta}</div></div>")
        else:
            cards.append(f"<div class=\"card\"><div class=\"caption\">#{rank} &middot; {r['score']:.4f}</div>"
                         f"<div>{esc(r['text'])}</div></div>")
    return write_page(path, title, f"{head}<h2>results</h2><div class=\"grid\">{''.join(cards)}</div>")


# ----------------------------------------------------------------------------- pictures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def recall_at_k(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@K in % for K = 1..max_k from 0-based ranks of the first correct result."""
    ranks = np.asarray(ranks)
    return np.array([100.0 * np.mean(ranks < k) for k in range(1, max_k + 1)])


def recall_plot(path: str | os.PathLike, rank_i2t: np.ndarray, rank_t2i: np.ndarray, max_k: int = 50,
                title: str = "recall@K") -> pathlib.Path:
    """Recall@K curves of both directions (image->text and text->image) as a PNG."""
    plt = _pyplot()
    ks = np.arange(1, max_k + 1)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(ks, recall_at_k(rank_i2t, max_k), label="image -> text", lw=2, color="#1f77b4")
    ax.plot(ks, recall_at_k(rank_t2i, max_k), label="text -> image", lw=2, color="#d62728")
    for k in (1, 5, 10):
        if k <= max_k:
            ax.axvline(k, color="#bbb", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def vir_heatmap(belief_scores: np.ndarray, num_tokens: int) -> np.ndarray:
    """VIR's belief scores of one image (the `belief_scores` intermediate of `PIR.encode_image`,
    over the first tokens: the mean token, then the Swin grid row-major) -> a (g, g) map of the
    grid tokens, g = sqrt(num_tokens - 1). Its sum is the scores' sum minus the mean token's
    (tokens the reference does not score, beyond its first 50, are 0)."""
    scores = np.asarray(belief_scores, np.float64).reshape(-1)
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"{num_tokens} tokens are not a mean token plus a square grid")
    flat = np.zeros(grid * grid)
    n = min(len(scores) - 1, grid * grid)
    flat[:n] = scores[1:1 + n]
    return flat.reshape(grid, grid)


def heatmap_overlay(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray,
                    title: str = "VIR belief") -> pathlib.Path:
    """The image with `heatmap` drawn over it cell by cell (one cell per Swin token) as a PNG."""
    plt = _pyplot()
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(3.2, 3.2 * h / w + 0.3), dpi=100)
    ax.imshow(image, extent=(0, w, h, 0))
    im = ax.imshow(heatmap, cmap="inferno", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
    g = heatmap.shape[0]
    for i in range(1, g):  # the token grid
        ax.axhline(i * h / g, color="white", lw=0.3, alpha=0.5)
        ax.axvline(i * w / heatmap.shape[1], color="white", lw=0.3, alpha=0.5)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- retrieval report
REPORT_SAMPLE = 24  # queries shown per direction
IMAGE_SEED = 1  # the image queries' sample is drawn with seed + IMAGE_SEED


def sample_queries(n: int, k: int, seed: int) -> np.ndarray:
    """The (sorted) query indices a report shows: `k` of `n`, drawn from `seed`."""
    return np.sort(np.random.default_rng(seed).choice(n, min(k, n), replace=False))


def _top(sims_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, indices) of each row, on device."""
    import jax

    scores, idx = jax.lax.top_k(jax.numpy.asarray(sims_rows, jax.numpy.float32), min(k, sims_rows.shape[1]))
    return np.asarray(scores), np.asarray(idx)


def retrieval_report(out_dir: str | os.PathLike, metrics: Mapping[str, float], sims: np.ndarray,
                     img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], captions: Sequence[str],
                     load_image: Callable[[int], np.ndarray], *, image_names: Sequence[str] | None = None,
                     heatmaps: Mapping[int, np.ndarray] | Callable[[Sequence[int]], Mapping[int, np.ndarray]] | None = None,
                     metric_keys: Sequence[str] | None = None, sample: int = REPORT_SAMPLE, top: int = 5, seed: int = 0,
                     title: str = "Retrieval report") -> pathlib.Path:
    """`index.html` in `out_dir`: the metric table, `recall.png`, and for `sample` queries of
    each direction (seeded) their top-`top` results, the correct ones marked, worst first.
    `sims` (N_img, N_txt); `load_image(i)` the uint8 image i; `heatmaps` ({i: (g, g)}, or a
    function of the sampled image indices giving it), when given, draws VIR's belief over each
    sampled query image (`sample_queries(N_img, sample, seed + IMAGE_SEED)` says which)."""
    from rsvl_jax.eval.retrieval import retrieval_ranks

    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sims = np.asarray(sims, np.float32)
    rank_i2t, rank_t2i = retrieval_ranks(sims, img2txt, txt2img)
    recall_plot(out / "recall.png", rank_i2t, rank_t2i, max_k=max(10, min(100, max(sims.shape))))
    names = list(image_names) if image_names is not None else [f"image {i}" for i in range(sims.shape[0])]
    thumbs: dict[int, str] = {}

    def thumb(i: int) -> str:
        if i not in thumbs:
            save_image(load_image(i), out / "images" / f"img_{i:06d}.jpg", max_side=192)
            thumbs[i] = f"images/img_{i:06d}.jpg"
        return thumbs[i]

    # text -> image: a caption and its top images
    t_q = sample_queries(sims.shape[1], sample, seed)
    t_q = t_q[np.argsort(-rank_t2i[t_q], kind="stable")]
    t_scores, t_idx = _top(sims[:, t_q].T, top)
    t_cards = []
    for q, sc, ix in zip(t_q, t_scores, t_idx):
        gt = int(txt2img[q])
        figs = "".join(
            f"<figure class=\"{'hit' if int(i) == gt else ''}\"><img src=\"{thumb(int(i))}\" alt=\"{esc(names[int(i)])}\">"
            f"{'<span class=hit-mark>&#10003;</span> ' if int(i) == gt else ''}{s:.3f}</figure>"
            for s, i in zip(sc, ix))
        t_cards.append(f"<div class=\"card\" data-kind=\"t2i\" data-rank=\"{int(rank_t2i[q])}\">"
                       f"<div class=\"caption\">{esc(captions[q])}</div><div class=\"meta\">correct image at rank "
                       f"{int(rank_t2i[q]) + 1}: {esc(names[gt])}</div><div class=\"row\">{figs}</div></div>")

    # image -> text: an image and its top captions (with the VIR heatmap when there is one)
    i_q = sample_queries(sims.shape[0], sample, seed + IMAGE_SEED)
    i_q = i_q[np.argsort(-rank_i2t[i_q], kind="stable")]
    i_scores, i_idx = _top(sims[i_q], top)
    maps = {} if heatmaps is None else dict(heatmaps([int(i) for i in i_q]) if callable(heatmaps) else heatmaps)
    i_cards = []
    for q, sc, ix in zip(i_q, i_scores, i_idx):
        gt = set(int(t) for t in img2txt[q])
        items = "".join(f"<li class=\"{'hit' if int(t) in gt else ''}\">{'&#10003; ' if int(t) in gt else ''}"
                        f"{esc(captions[int(t)])} <span class=\"meta\">({s:.3f})</span></li>" for s, t in zip(sc, ix))
        pics = f"<figure><img src=\"{thumb(int(q))}\" alt=\"{esc(names[q])}\">query</figure>"
        if int(q) in maps:
            heat = f"images/vir_{int(q):06d}.png"
            heatmap_overlay(out / heat, load_image(int(q)), maps[int(q)])
            pics += f"<figure><img src=\"{heat}\" alt=\"VIR belief of {esc(names[q])}\">VIR belief</figure>"
        i_cards.append(f"<div class=\"card\" data-kind=\"i2t\" data-rank=\"{int(rank_i2t[q])}\"><div class=\"row\">{pics}</div>"
                       f"<div class=\"meta\">{esc(names[q])}: first correct caption at rank {int(rank_i2t[q]) + 1}</div>"
                       f"<ol>{items}</ol></div>")

    body = (metrics_table(metrics, metric_keys)
            + "<img class=\"plot\" src=\"recall.png\" alt=\"recall at K, both directions\">"
            + f"<h2>text &rarr; image: {len(t_cards)} sampled captions, worst first (correct image marked &#10003;)</h2>"
            + f"<div class=\"grid wide\">{''.join(t_cards)}</div>"
            + f"<h2>image &rarr; text: {len(i_cards)} sampled images, worst first (correct captions marked &#10003;)</h2>"
            + f"<div class=\"grid wide\">{''.join(i_cards)}</div>")
    return write_page(out / "index.html", title, body)


# ----------------------------------------------------------------------------- captioning report
def caption_report(out_dir: str | os.PathLike, metrics: Mapping[str, float], rows: Sequence[Mapping],
                   references: Mapping[int, Sequence[str]], per_image: Mapping, load_image: Callable[[Mapping], np.ndarray],
                   *, metric_keys: Sequence[str] | None = None, notes: Sequence[str] = (), limit: int = 500,
                   title: str = "Captioning report") -> pathlib.Path:
    """`index.html` in `out_dir`: the metric table, then each image (worst CIDEr first, at most
    `limit`) with its generated caption, its references and its CIDEr. `rows`: {image_id,
    file_name, caption, ...}; `per_image[image_id]["CIDEr"]`; `load_image(row)` its uint8 image."""
    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    def cider(r):
        per = per_image.get(r["image_id"], per_image.get(int(r["image_id"]), {}))
        return float(per.get("CIDEr", float("nan")))

    ordered = sorted(rows, key=lambda r: (np.nan_to_num(cider(r), nan=np.inf), int(r["image_id"])))[:limit]
    cards = []
    for r in ordered:
        name = f"images/cap_{int(r['image_id'])}.jpg"
        save_image(load_image(r), out / name, max_side=224)
        refs = "".join(f"<li>{esc(c)}</li>" for c in references.get(int(r["image_id"]), ()))
        cards.append(f"<div class=\"card\" data-cider=\"{cider(r):.4f}\"><img src=\"{name}\" alt=\"{esc(r.get('file_name', ''))}\">"
                     f"<div class=\"caption\">{esc(r['caption'])}</div>"
                     f"<div class=\"meta\">CIDEr {cider(r):.3f} &middot; {esc(r.get('file_name', ''))}</div>"
                     f"<div class=\"meta\">references:</div><ul>{refs}</ul></div>")
    note_html = "".join(f"<p class=\"meta\">note: {esc(n)}</p>" for n in notes)
    body = (metrics_table(metrics, metric_keys, ".4f") + note_html
            + f"<h2>{len(cards)} of {len(rows)} images, worst CIDEr first</h2><div class=\"grid\">{''.join(cards)}</div>")
    return write_page(out / "index.html", title, body)


__all__ = ["REPORT_SAMPLE", "caption_page", "sample_queries", "caption_report", "heatmap_overlay", "metrics_table", "recall_at_k", "recall_plot",
           "retrieval_report", "save_image", "search_page", "thumb_name", "vir_heatmap", "write_page"]
