"""Caption your own images: `python -m rsvl_jax.caption --config configs/bita.py:stage=caption --checkpoint RUN_OR_PTH PATH...`.

PATH: image files or folders (searched recursively for .jpg .jpeg .png .bmp .gif .webp .tif
.tiff). Each image gets the preprocessing evaluation uses and the caption evaluation's beam
search gives; `--alternatives N` also keeps up to N other finished beams with their scores.
Writes, into `--out` (default `<workdir>/folder_captions/<name of the first PATH>`):

  captions.jsonl   one record per image (or tile): {"path", "caption", "score", "image_size"
                   [h, w], and "window" [left, top, right, bottom] for a tile, "alternatives"
                   [{"caption", "score"}] with --alternatives}
  captions.html    a grid of thumbnails (thumbs/) with their captions

TIFF and GeoTIFF (8/16-bit, float, 1..N bands) are read with tifffile: `--bands 3,2,1` picks
0-based bands (default the first three; one band = grey), non-8-bit bands are stretched from
their `--stretch 2,98` percentiles to 8 bits. Images larger than the model input are resized,
or with `--tile` cut into model-input tiles whose pixel window is recorded. A file that cannot
be read is reported by name and skipped. CHECKPOINT is a run directory, a converted
checkpoint or a released .pth, as for `python -m rsvl_jax.evaluate`. Runs on one host.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax

from rsvl_jax import parallel, tasks
from rsvl_jax.data import images
from rsvl_jax.eval import report
from rsvl_jax.config import ConfigError
from rsvl_jax.errors import UserError, run_cli


def default_out(config, kind: str, first_path: str) -> pathlib.Path:
    name = pathlib.Path(os.path.abspath(first_path)).name or "images"
    return pathlib.Path(config.workdir) / kind / name


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.caption", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursive)")
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, a converted checkpoint directory, or a PyTorch file")
    parser.add_argument("--step", type=int, default=None, help="a step of the run (default: its best)")
    parser.add_argument("--out", default=None, help="output folder (default: <workdir>/folder_captions/<PATH name>)")
    parser.add_argument("--alternatives", type=int, default=0, help="also keep up to N other beams with scores")
    parser.add_argument("--thumb-size", type=int, default=256, help="longer side of the page's thumbnails")
    images.add_arguments(parser)
    parsed = tasks.parse_entry(parser, argv)
    if isinstance(parsed, int):
        return parsed
    config, args, task = parsed
    if task.caption_images is None:
        raise ConfigError(f"the {task.name} task of this config does not caption images "
                          "(use configs/bita.py:stage=caption)")
    bands, stretch = images.parse_bands(args.bands), images.parse_stretch(args.stretch)
    files = images.find_images(args.paths)
    if not files:
        raise UserError(f"no images under {', '.join(args.paths)} (looked for {' '.join(images.IMAGE_SUFFIXES)})")
    out = pathlib.Path(args.out) if args.out else default_out(config, "folder_captions", args.paths[0])
    out.mkdir(parents=True, exist_ok=True)
    batch_size = args.batch_size or max(1, config.eval_batch_size)
    from tqdm import tqdm

    with jax.set_mesh(parallel.make_mesh(config.mesh)):
        model = tasks.load_model(task, config, args.checkpoint, args.step)
        bar = tqdm(total=len(files), unit="file", desc="captioning", disable=None)
        unreadable = []

        def skipped(path, message):
            unreadable.append(path)
            bar.write(f"warning: {message} (skipped)", file=sys.stderr)
            bar.update(1)

        loader = images.FolderImages(files, task.eval_transform, batch_size=batch_size, tile=args.tile,
                                     bands=bands, stretch=stretch, stretch_8bit=args.stretch_8bit,
                                     thumb_size=args.thumb_size, on_error=skipped)
        rows, done, views, started = [], set(), 0, time.perf_counter()
        jsonl = out / "captions.jsonl"
        tmp = jsonl.with_name(jsonl.name + ".tmp")
        with open(tmp, "w") as f:
            for batch in loader:
                n = len(batch["paths"])
                results = task.caption_images(model, batch["image"], args.alternatives)[:n]
                for path, window, hw, thumb, beams in zip(batch["paths"], batch["windows"], batch["sizes"],
                                                           batch["thumbs"], results):
                    record = {"path": path, "caption": beams[0][0], "score": round(beams[0][1], 5),
                              "image_size": list(hw)}
                    if window is not None:
                        record["window"] = list(window)
                    if args.alternatives:
                        record["alternatives"] = [{"caption": c, "score": round(s, 5)} for c, s in beams[1:]]
                    f.write(json.dumps(record) + "\n")
                    name = report.thumb_name(path, window)
                    report.save_image(thumb, out / "thumbs" / name, max_side=args.thumb_size)
                    rows.append(dict(record, thumb=f"thumbs/{name}"))
                    views += 1
                    if path not in done:
                        done.add(path)
                        bar.update(1)
        tmp.replace(jsonl)
        bar.close()
    seconds = time.perf_counter() - started
    summary = (f"{views} caption{'s' if views != 1 else ''} of {len(done)} image file{'s' if len(done) != 1 else ''}"
               + (f", {len(unreadable)} unreadable file{'s' if len(unreadable) != 1 else ''} skipped" if unreadable else ""))
    page = report.caption_page(out / "captions.html", rows, title=f"Captions: {args.paths[0]}", summary=summary)
    print(f"{summary} in {seconds:.1f} s ({views / max(seconds, 1e-9):.2f} captions/s)")
    for path in unreadable:
        print(f"unreadable: {path}")
    print(f"wrote {jsonl} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
