"""grain pipelines for PIR-style retrieval: training batches and evaluation batches.

A *source* is any random-access sequence of records ``{"image": encoded bytes or uint8 HxWx3,
"captions": [str|bytes], "label": int, "image_id": int, "filename": str|bytes}``: a TFDS
array_record split (``builders.open_split``) or a plain list (tests, synthetic data in memory).

Training (PIR §1.1, §1.5): one item per (image, caption) pair; ``idx`` = the record index,
which is PIR's contiguous index of the image (records come in order of first appearance).
Each epoch is a permutation drawn from (seed, epoch), padded by repeating its head to a
multiple of the host count (like ``DistributedSampler``) and dealt out round-robin to hosts;
each host cuts its share into ``drop_remainder`` batches. An item's augmentation uses
``np.random.default_rng([seed, epoch, item])``, so it does not depend on hosts or threads.

The loader's state is ``{"epoch", "step"}`` (plus what it was built with, checked on restore):
the pipeline behind it is rebuilt from that position, so a resumed run sees exactly the
batches it would have seen, whatever grain had prefetched.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import grain
import numpy as np

from rsvl_jax.data import text as text_lib
from rsvl_jax.data.builders.common import UNKNOWN_LABEL, decode_image
from rsvl_jax.data.transforms import EvalTransform, TrainTransform

STATE_VERSION = 1


# ----------------------------------------------------------------------------- record access
def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _records(source, chunk: int = 1024):
    """All records in order, fetched in chunks when the source supports it (array_record)."""
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        yield from (getitems(keys) if getitems else (source[k] for k in keys))


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say (tests simulate hosts explicitly)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _pad_id(tokenizer) -> int:
    pad = tokenizer.token_to_id("[PAD]")
    if pad is None:
        raise ValueError("the tokenizer's vocabulary has no [PAD] token")
    return pad


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch))


# ----------------------------------------------------------------------------- training
def caption_items(source, require_label: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(items, labels): items[k] = (record index, caption index) for every caption.

    With ``require_label`` a record without a scene label is an error naming it (PIR §7 Q27:
    the affiliation loss needs one for every training item).
    """
    items, labels = [], []
    for r, rec in enumerate(_records(source)):
        n = len(rec["captions"])
        if n == 0:
            raise ValueError(f"train record {r} ({_str(rec['filename'])}) has no captions")
        label = int(rec["label"])
        if require_label and label == UNKNOWN_LABEL:
            raise ValueError(f"train record {r} ({_str(rec['filename'])}) has no scene label "
                             f"(label {UNKNOWN_LABEL}); PIR's affiliation loss needs one "
                             "(pass require_label=False to train without it)")
        items.extend((r, j) for j in range(n))
        labels.append(label)
    return np.asarray(items, np.int64).reshape(-1, 2), np.asarray(labels, np.int64)


class TrainLoader:
    """Endless iterator of per-host training batches with a JSON-able, exact resume state.

    Batches: ``{"image": float32 (B,S,S,3), "input_ids": int32 (B,L), "idx": int32 (B,),
    "label": int32 (B,)}``; L is the batch's longest caption rounded up by ``text_bucket``
    (see ``text.pad_batch``; None = exact, as the reference pads per batch).
    """

    def __init__(self, source, tokenizer, *, batch_size: int, image_size: int = 224,
                 seed: int = 0, transform: TrainTransform | None = None, text_bucket=8,
                 max_words: int = 30, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 8,
                 prefetch_batches: int = 2, require_label: bool = True, pad_id: int | None = None):
        self.source = source
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.transform = transform or TrainTransform(size=image_size)
        self.text_bucket = text_bucket
        self.max_words = max_words
        self.process_index, self.process_count = _host(process_index, process_count)
        self.num_threads = num_threads
        self.prefetch_batches = prefetch_batches
        self.pad_id = _pad_id(tokenizer) if pad_id is None else pad_id
        self.items, self._labels = caption_items(source, require_label)
        per_host = -(-len(self.items) // self.process_count)
        self.steps_per_epoch = per_host // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.items)} training items over {self.process_count} hosts "
                             f"give no full batch of {self.batch_size}")
        self._epoch, self._step, self._it = 0, 0, None
        self._text_lengths = None  # per item, computed on first use with several hosts

    @property
    def num_items(self) -> int:
        return len(self.items)

    # -- epoch plan
    def epoch_items(self, epoch: int) -> np.ndarray:
        """This host's item indices for ``epoch``, in order, whole batches only."""
        return self._host_items(epoch, self.process_index)

    def _host_items(self, epoch: int, host: int) -> np.ndarray:
        """Each step's global batch is a contiguous run of the epoch's permutation and host h
        takes its h-th block, so the hosts' batches, concatenated in host order (as
        `make_array_from_process_local_data` assembles them), are the one-host batch."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        pad = (-len(perm)) % self.process_count
        if pad:
            perm = np.concatenate([perm, perm[:pad]])
        steps, b, hosts = self.steps_per_epoch, self.batch_size, self.process_count
        return perm[: steps * b * hosts].reshape(steps, hosts, b)[:, host].reshape(-1)

    # -- the text side (PIR's; another model's loader overrides these two)
    def clean_caption(self, raw: str) -> str:
        """A caption as the model reads it: PIR's normalisation (raises ValueError on an empty one)."""
        return text_lib.pre_caption(raw, self.max_words)

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of cleaned captions, before padding."""
        return text_lib.encode_pir(list(captions), self.tokenizer)

    # -- one padding length per global batch
    def _captions(self) -> list[str]:
        """Every item's caption as `_load` hands it to `_collate`."""
        return [self.clean_caption(_str(c)) for rec in _records(self.source) for c in rec["captions"]]

    def text_lengths(self, captions: Sequence[str]) -> np.ndarray:
        """Token count of each caption as `_collate` encodes it (before padding)."""
        return np.asarray([len(ids) for ids in self.encode(captions)])

    def pad_lengths(self, epoch: int) -> np.ndarray:
        """The text length of every step's batch, decided from the *global* batch: with
        several hosts each host pads to the bucket of the longest caption any host has at that
        step, so every process count gives the single-process batches (PIR's text encoder has
        no mask, so padding changes embeddings, Q5) and `make_array_from_process_local_data`
        sees one shape. One host: 0, i.e. pad to its own batch (the same thing)."""
        if self.process_count == 1:
            return np.zeros(self.steps_per_epoch, np.int64)
        if self._text_lengths is None:
            self._text_lengths = self.text_lengths(self._captions())
        longest = np.zeros(self.steps_per_epoch, np.int64)
        for host in range(self.process_count):
            shard = self._host_items(epoch, host).reshape(self.steps_per_epoch, self.batch_size)
            longest = np.maximum(longest, self._text_lengths[shard].max(axis=1))
        return np.asarray([text_lib.padded_length(int(n), self.text_bucket) for n in longest])

    def _load(self, item: int, epoch: int) -> dict:
        rec_i, cap_i = (int(v) for v in self.items[item])
        rec = self.source[rec_i]
        try:
            image = decode_image(rec["image"])
        except Exception as e:
            raise ValueError(f"train record {rec_i} ({_str(rec['filename'])}): cannot decode "
                             f"image ({type(e).__name__}: {e})") from e
        rng = np.random.default_rng([self.seed, epoch, item])
        try:
            caption = self.clean_caption(_str(rec["captions"][cap_i]))
        except ValueError as e:
            raise ValueError(f"train record {rec_i} ({_str(rec['filename'])}) caption {cap_i}: {e}") from e
        return {"image": self.transform(image, rng), "caption": caption, "idx": rec_i,
                "label": int(self._labels[rec_i])}

    def _bucket(self, examples: Sequence[dict]):
        """The step's global length (see `pad_lengths`), or the loader's buckets on one host."""
        pad_to = examples[0].get("pad_to", 0)
        return (pad_to,) if pad_to else self.text_bucket

    def _collate(self, examples: Sequence[dict]) -> dict:
        ids = self.encode([e["caption"] for e in examples])
        return {
            "image": np.stack([e["image"] for e in examples]).astype(np.float32, copy=False),
            "input_ids": text_lib.pad_batch(ids, bucket=self._bucket(examples), pad_id=self.pad_id),
            "idx": np.asarray([e["idx"] for e in examples], np.int32),
            "label": np.asarray([e["label"] for e in examples], np.int32),
        }

    def _load_row(self, row, epoch: int) -> dict:
        return {**self._load(int(row[0]), epoch), "pad_to": int(row[1])}

    def _start(self) -> None:
        start = self._step * self.batch_size
        items = self.epoch_items(self._epoch)[start:]
        pad_to = np.repeat(self.pad_lengths(self._epoch), self.batch_size)[start:]
        todo = np.stack([items, pad_to], axis=1)
        ds = (grain.MapDataset.source(todo)
              .map(functools.partial(self._load_row, epoch=self._epoch))
              .batch(self.batch_size, drop_remainder=True, batch_fn=self._collate))
        opts = _read_options(self.num_threads, self.prefetch_batches * self.batch_size)
        self._it = iter(ds.to_iter_dataset(opts))

    # -- iteration and state
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step, self._it = self._epoch + 1, 0, None
        return batch

    @property
    def epoch(self) -> int:
        """The epoch the *next* batch belongs to."""
        return self._epoch

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self._epoch, "step": self._step,
                "seed": self.seed, "num_items": len(self.items), "batch_size": self.batch_size,
                "process_index": self.process_index, "process_count": self.process_count}

    def set_state(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state`` (from ``get_state``).

        ``strict`` (default) refuses a state from a different setup, since the batches would
        differ. ``strict=False`` accepts another batch size or host layout (same seed and data):
        it resumes in the same epoch after the same number of items consumed by all hosts,
        rounded down to a whole step -- close to, but not exactly, the uninterrupted run.
        """
        mine = self.get_state()
        for key in ["version", "seed", "num_items"]:
            if state.get(key) != mine[key]:
                raise ValueError(f"iterator state has {key}={state.get(key)!r} but this loader "
                                 f"has {mine[key]!r}; the batches would differ")
        # The global batches depend only on the global batch size (see `_host_items`), so a
        # state resumes exactly on another host count with the same global batch.
        theirs = int(state["batch_size"]) * int(state["process_count"])
        if strict and theirs != self.batch_size * self.process_count:
            raise ValueError(
                f"iterator state has batch_size={state['batch_size']} x process_count="
                f"{state['process_count']} (global {theirs}) but this loader has batch_size="
                f"{self.batch_size} x process_count={self.process_count}; the batches would differ "
                "(set_state(..., strict=False) resumes approximately)")
        epoch, step = int(state["epoch"]), int(state["step"])
        if not strict:
            consumed = step * int(state["batch_size"]) * int(state["process_count"])
            step = consumed // (self.batch_size * self.process_count)
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"iterator state epoch={epoch} step={step} is out of range "
                             f"({self.steps_per_epoch} steps per epoch)")
        self._epoch, self._step, self._it = epoch, step, None


# ----------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class EvalTexts:
    """PIR's eval text side (§1.1): flat normalised captions in file order and the maps."""

    captions: list[str]
    img2txt: list[list[int]]
    txt2img: np.ndarray  # int32 (num_texts,)

    @property
    def num_images(self) -> int:
        return len(self.img2txt)


def eval_texts(source, max_words: int = 30) -> EvalTexts:
    """Captions of every image, normalised, in order; an empty one is an error naming it."""
    captions, img2txt, txt2img = [], [], []
    for i, rec in enumerate(_records(source)):
        img2txt.append([])
        for j, raw in enumerate(rec["captions"]):
            try:
                captions.append(text_lib.pre_caption(_str(raw), max_words))
            except ValueError as e:
                raise ValueError(f"eval record {i} ({_str(rec['filename'])}) caption {j}: {e}") from e
            img2txt[-1].append(len(txt2img))
            txt2img.append(i)
    return EvalTexts(captions, img2txt, np.asarray(txt2img, np.int32))


class EvalImages:
    """Eval image batches in file order, padded with a mask so every host runs ``num_steps``.

    Global step s covers images [s*G, (s+1)*G) with G = batch_size * process_count; host h
    gets the h-th block of ``batch_size`` of them, so assembling the hosts' slices in order
    gives the images in file order. Batches: ``{"image": float32 (B,S,S,3), "index": int32
    (B,) (-1 on padding), "label": int32 (B,), "mask": bool (B,)}``. Re-iterable.
    """

    def __init__(self, source, *, batch_size: int, image_size: int = 224,
                 transform: EvalTransform | None = None, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 8,
                 prefetch_batches: int = 2):
        self.source = source
        self.batch_size = int(batch_size)
        self.transform = transform or EvalTransform(size=image_size)
        self.process_index, self.process_count = _host(process_index, process_count)
        self.num_threads, self.prefetch_batches = num_threads, prefetch_batches
        self.num_images = len(source)
        per_step = self.batch_size * self.process_count
        self.num_steps = -(-self.num_images // per_step)
        self._size = self.transform.size

    def _index(self, k: int) -> int:
        step, row = divmod(k, self.batch_size)
        return step * self.batch_size * self.process_count + self.process_index * self.batch_size + row

    def _load(self, k: int) -> dict:
        i = self._index(k)
        if i >= self.num_images:
            return {"image": np.zeros((self._size, self._size, 3), np.float32), "index": -1,
                    "label": UNKNOWN_LABEL, "mask": False}
        rec = self.source[i]
        try:
            image = decode_image(rec["image"])
        except Exception as e:
            raise ValueError(f"eval record {i} ({_str(rec['filename'])}): cannot decode image "
                             f"({type(e).__name__}: {e})") from e
        return {"image": self.transform(image), "index": i, "label": int(rec["label"]), "mask": True}

    @staticmethod
    def _collate(examples: Sequence[dict]) -> dict:
        return {
            "image": np.stack([e["image"] for e in examples]).astype(np.float32, copy=False),
            "index": np.asarray([e["index"] for e in examples], np.int32),
            "label": np.asarray([e["label"] for e in examples], np.int32),
            "mask": np.asarray([e["mask"] for e in examples], bool),
        }

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self):
        ds = (grain.MapDataset.range(self.num_steps * self.batch_size)
              .map(self._load)
              .batch(self.batch_size, drop_remainder=True, batch_fn=self._collate))
        return iter(ds.to_iter_dataset(_read_options(self.num_threads,
                                                     self.prefetch_batches * self.batch_size)))
