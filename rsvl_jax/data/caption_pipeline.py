"""grain pipelines for BITA captioning (spec BITA §2.7, §4.2, §6-7), same conventions as PIR's
``pipeline.py``: deterministic by (seed, epoch), per-host sharding, exact-resume state.

Sources are the same records as PIR's (``builders.open_split`` or plain lists of dicts with
``image``, ``captions``, ``image_id``, ``filename``, ``label``).

Training, ``CaptionTrainLoader``: one item per (image, caption) pair over one or several
sources concatenated (stages 1 and 2 train on RSICD + NWPU + UCM train together, §6.2);
image transform ``bita_image_train``; caption processor ``bita_caption`` (§6.3, max 50
words, the prompt prepended with no separator, Q7). Batches:

* stage 1: ``text_ids``/``text_mask`` int32 (B, 32): ``[CLS] w.. [SEP] [PAD]..``, always
  exactly 32 because the Fourier mixing sees the pads (Q2);
* stages 2-3: OPT ids ``</s> + tokens(text + "\\n")`` truncated to 32 (BOS included, so a long
  caption loses its "\\n", Q17), right-padded with ``<pad>`` up to a bucket length (8, 16, 24
  or 32 by default, so jit sees at most four shapes), and ``targets`` (B, T): the ids with
  pads and the first ``prompt_length`` columns set to -100 (§4.2 step 5; with the empty
  stage-2 prompt BOS stays a target, Q18). The 32 query columns of -100 (§4.2 step 6) are
  the model's to prepend: ``targets`` covers the text columns only.

Every batch also has ``image`` float32 (B, S, S, 3), ``image_id`` int32 and ``dataset``
int32 (the source's position), so ids of different sources never need to be unique.

Evaluation, ``CaptionEvalImages``: one item per image in file order with the eval transform
(``bita_image_eval``; ``train_transform=True`` reproduces the reference's fine-tune config,
which evaluates with random crops and flips, Q8), padded batches with a mask so every host
runs the same steps. ``ground_truth``/``coco_ground_truth`` give the references keyed by the
same unique ids the batches carry (Q9, Q10).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from rsvl_jax.data import bita_text
from rsvl_jax.data import pipeline as pir_pipeline
from rsvl_jax.data import text as text_lib
from rsvl_jax.data.builders.common import DatasetError, decode_image
from rsvl_jax.data.pipeline import _host, _records, _str
from rsvl_jax.data.transforms import EvalTransform, TrainTransform, bita_image_eval, bita_image_train

STATE_VERSION = 1
IGNORE = -100  # the LM loss's ignore index
STAGE1_LEN = 32
OPT_MAX_LEN = 32
OPT_BUCKETS = (8, 16, 24, 32)
CAPTION_PROMPT = "a photo of"  # BITA's fine-tune prompt, no trailing space (Q7)


# ----------------------------------------------------------------------------- opening data
def open_caption_split(name: str, split: str, data_dir, *, config=None, manual_dir=None,
                       on_error: str = "raise", decode: bool = False):
    """Build (once, checked against ``manual_dir`` on every call) and open one split.

    ``name``: rsicd | ucm_captions | nwpu_captions | sydney_captions | synthetic;
    ``config``: None (the official file: 'karpathy', or 'official' for NWPU), 'bita' (BITA's
    lists), or a synthetic config.
    """
    from rsvl_jax.data import builders

    builder = builders.build(name, data_dir, config=config, manual_dir=manual_dir, on_error=on_error)
    if split not in builder.info.splits:
        raise DatasetError(f"{name} ({builder.builder_config.name}) has no split {split!r}; it has "
                           f"{sorted(builder.info.splits)}")
    return builders.open_split(builder, split, decode=decode)


# ----------------------------------------------------------------------------- text
def process_captions(captions: Sequence[str], prompt: str = "", max_words: int = 50) -> list[str]:
    """``bita_caption`` on each caption (§6.3): the prompt is glued on with no separator."""
    return [text_lib.bita_pre_caption(c, max_words, prompt) for c in captions]


def opt_targets(ids: np.ndarray, mask: np.ndarray, prompt_length: int) -> np.ndarray:
    """§4.2 step 5: pads -> -100, and the first ``prompt_length`` columns (BOS + prompt) ->
    -100. ``prompt_length`` = 0 for the empty prompt, so BOS is a target (Q18)."""
    targets = np.where(np.asarray(mask).astype(bool), ids, IGNORE).astype(np.int32)
    targets[:, :prompt_length] = IGNORE
    return targets


def caption_items(sources: Sequence) -> np.ndarray:
    """(N, 3) int64: (source, record, caption) for every caption of every source, in order."""
    items = []
    for d, source in enumerate(sources):
        for r, rec in enumerate(_records(source)):
            n = len(rec["captions"])
            if n == 0:
                raise DatasetError(f"train source {d} record {r} ({_str(rec['filename'])}) has no captions")
            items.extend((d, r, j) for j in range(n))
    return np.asarray(items, np.int64).reshape(-1, 3)


# ----------------------------------------------------------------------------- training
class CaptionTrainLoader(pir_pipeline.TrainLoader):
    """Endless per-host BITA training batches with a JSON-able exact resume state.

    ``stage``: 1 (BERT ids, ``tokenizer`` from ``bita_text.load_bita_bert_tokenizer``) or 2/3
    (OPT ids, ``tokenizer`` from ``bita_text.load_opt_tokenizer``). ``prompt``: "" for stages
    1-2, ``CAPTION_PROMPT`` for the caption fine-tune (stage 3). ``prompt_fix=True`` tokenises
    prompt and caption separately (Q7 fixed; pass the prompt with its trailing space).
    ``sources``: one source, a list of sources or ``{name: source}`` (concatenated in that
    order). ``batch_size`` is per host. The epoch plan, sharding, iteration and ``get_state`` /
    ``set_state`` are PIR's ``TrainLoader``'s, over the (source, record, caption) items.
    """

    def __init__(self, sources, tokenizer, *, batch_size: int, stage: int, image_size: int = 224,
                 seed: int = 0, prompt: str = "", prompt_fix: bool = False, max_words: int = 50,
                 max_len: int | None = None, text_bucket=OPT_BUCKETS,
                 transform: TrainTransform | None = None, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 8, prefetch_batches: int = 2):
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        if isinstance(sources, Mapping):
            self.source_names = list(sources)
            sources = list(sources.values())
        elif isinstance(sources, (list, tuple)) and not (
                sources and isinstance(sources[0], Mapping) and "captions" in sources[0]):
            self.source_names = [str(k) for k in range(len(sources))]
        else:
            sources, self.source_names = [sources], ["0"]
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.stage = stage
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.prompt, self.prompt_fix = prompt, bool(prompt_fix)
        self.max_words = max_words
        self.max_len = max_len or (STAGE1_LEN if stage == 1 else OPT_MAX_LEN)
        self.text_bucket = text_bucket
        self.transform = transform or bita_image_train(image_size)
        self.process_index, self.process_count = _host(process_index, process_count)
        self.num_threads = num_threads
        self.prefetch_batches = prefetch_batches
        if stage == 1:
            if tokenizer.token_to_id("[CLS]") is None or tokenizer.token_to_id("[SEP]") is None:
                raise ValueError("stage 1 needs the BERT word-piece tokenizer ([CLS]/[SEP])")
            self.prompt_length = 0
        else:
            self.prompt_length = bita_text.opt_prompt_length(tokenizer, prompt)
        self.items = caption_items(self.sources)
        per_host = -(-len(self.items) // self.process_count)
        self.steps_per_epoch = per_host // self.batch_size  # drop_last, as the reference
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.items)} training pairs over {self.process_count} hosts "
                             f"give no full batch of {self.batch_size}")
        self._epoch, self._step, self._it = 0, 0, None
        self._text_lengths = None

    def _load(self, item: int, epoch: int) -> dict:
        d, r, j = (int(v) for v in self.items[item])
        rec = self.sources[d][r]
        try:
            image = decode_image(rec["image"])
        except Exception as e:
            raise DatasetError(f"train source {self.source_names[d]} record {r} "
                               f"({_str(rec['filename'])}): cannot decode image "
                               f"({type(e).__name__}: {e})") from e
        rng = np.random.default_rng([self.seed, epoch, item])
        caption = _str(rec["captions"][j])
        prompt = "" if self.prompt_fix else self.prompt
        return {"image": self.transform(image, rng),
                "caption": text_lib.bita_pre_caption(caption, self.max_words, prompt),
                "image_id": int(rec["image_id"]), "dataset": d}

    def _collate(self, examples: Sequence[dict]) -> dict:
        texts = [e["caption"] for e in examples]
        out = {"image": np.stack([e["image"] for e in examples]).astype(np.float32, copy=False)}
        if self.stage == 1:
            ids, mask = bita_text.encode_stage1(texts, self.tokenizer, self.max_len)
        else:
            ids, mask = bita_text.encode_opt_captions(
                self.tokenizer, texts, self.max_len, self._bucket(examples),
                prompt=self.prompt if self.prompt_fix else None)
            out["targets"] = opt_targets(ids, mask, self.prompt_length)
        out["text_ids"], out["text_mask"] = ids, mask
        out["image_id"] = np.asarray([e["image_id"] for e in examples], np.int32)
        out["dataset"] = np.asarray([e["dataset"] for e in examples], np.int32)
        return out

    def _captions(self) -> list[str]:
        prompt = "" if self.prompt_fix else self.prompt
        return [text_lib.bita_pre_caption(_str(rec["captions"][j]), self.max_words, prompt)
                for source in self.sources for rec in _records(source) for j in range(len(rec["captions"]))]

    def text_lengths(self, captions: Sequence[str]) -> np.ndarray:
        if self.stage == 1:  # always exactly max_len (Q2)
            return np.full(len(captions), self.max_len)
        _, mask = bita_text.encode_opt_captions(self.tokenizer, list(captions), self.max_len, None,
                                                prompt=self.prompt if self.prompt_fix else None)
        return mask.sum(axis=1)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["kind"] = f"bita_stage{self.stage}"
        return state

    def set_state(self, state: dict[str, Any], strict: bool = True) -> None:
        if state.get("kind", f"bita_stage{self.stage}") != f"bita_stage{self.stage}":
            raise ValueError(f"iterator state is for {state.get('kind')!r}, this loader is "
                             f"bita_stage{self.stage}")
        super().set_state(state, strict)


# ----------------------------------------------------------------------------- evaluation
class CaptionEvalImages(pir_pipeline.EvalImages):
    """Eval image batches in file order, padded with a mask (see ``pipeline.EvalImages``).

    Batches: ``image`` float32 (B,S,S,3), ``image_id`` int32 (-1 on padding), ``index``
    int32 (record index, -1 on padding), ``mask`` bool. ``train_transform=True`` mirrors
    Q8 (random crop + flip at eval, drawn from ``(seed, image index)``); default: resize only.
    """

    def __init__(self, source, *, batch_size: int, image_size: int = 224,
                 transform: EvalTransform | None = None, train_transform: bool = False,
                 seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                 num_threads: int = 8, prefetch_batches: int = 2):
        super().__init__(source, batch_size=batch_size, image_size=image_size,
                         transform=transform or bita_image_eval(image_size),
                         process_index=process_index, process_count=process_count,
                         num_threads=num_threads, prefetch_batches=prefetch_batches)
        self.seed = int(seed)
        self.random_transform = bita_image_train(self._size) if train_transform else None

    def _load(self, k: int) -> dict:
        i = self._index(k)
        if i >= self.num_images:
            return {"image": np.zeros((self._size, self._size, 3), np.float32), "index": -1,
                    "image_id": -1, "mask": False}
        rec = self.source[i]
        try:
            image = decode_image(rec["image"])
        except Exception as e:
            raise DatasetError(f"eval record {i} ({_str(rec['filename'])}): cannot decode image "
                               f"({type(e).__name__}: {e})") from e
        if self.random_transform is not None:
            pixels = self.random_transform(image, np.random.default_rng([self.seed, i]))
        else:
            pixels = self.transform(image)
        return {"image": pixels, "index": i, "image_id": int(rec["image_id"]), "mask": True}

    @staticmethod
    def _collate(examples: Sequence[dict]) -> dict:
        return {
            "image": np.stack([e["image"] for e in examples]).astype(np.float32, copy=False),
            "image_id": np.asarray([e["image_id"] for e in examples], np.int32),
            "index": np.asarray([e["index"] for e in examples], np.int32),
            "mask": np.asarray([e["mask"] for e in examples], bool),
        }


# ----------------------------------------------------------------------------- ground truth
def ground_truth(source) -> dict[int, list[str]]:
    """``{image id: [raw reference captions]}`` in file order, from the same records (and so
    the same ids) the eval batches carry. Two records with one id is an error naming both."""
    refs: dict[int, list[str]] = {}
    where: dict[int, str] = {}
    for i, rec in enumerate(_records(source)):
        image_id = int(rec["image_id"])
        name = f"record {i} ({_str(rec['filename'])})"
        if image_id in refs:
            raise DatasetError(f"eval {name}: image id {image_id} is also the id of {where[image_id]}")
        refs[image_id] = [_str(c) for c in rec["captions"]]
        where[image_id] = name
    return refs


def coco_ground_truth(source) -> dict:
    """The COCO-format ground truth (``images``, ``annotations``) pycocoevalcap reads."""
    from rsvl_jax.eval.captioning import coco_gt  # the one place that owns the format

    return coco_gt(ground_truth(source))


def write_ground_truth(source, path: str | os.PathLike) -> pathlib.Path:
    """Write ``coco_ground_truth(source)`` to ``path`` (atomically) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(coco_ground_truth(source)))
    tmp.replace(path)
    return path


def read_ground_truth(path: str | os.PathLike) -> dict[int, list[str]]:
    """A COCO-format ground-truth file -> ``{image id: [references]}`` (its image order)."""
    from rsvl_jax.data.builders.bita_lists import parse_gt

    return parse_gt(pathlib.Path(path))


__all__ = ["CAPTION_PROMPT", "IGNORE", "CaptionEvalImages", "CaptionTrainLoader", "caption_items",
           "coco_ground_truth", "ground_truth", "open_caption_split", "opt_targets",
           "process_captions", "read_ground_truth", "write_ground_truth"]
