"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) via pycocoevalcap,
as BITA reports them (spec BITA §7: both sides PTB-tokenised, then every scorer).

With Java the numbers are pycocoevalcap's own `COCOEvalCap` numbers (tested). Per-image scores
(CIDEr, BLEU-4, ...) come with them (`caption_scores`), and `write_captions` writes the
captions with those scores as JSON.

Java-backed parts degrade instead of failing, each with a ``CaptionMetricsWarning`` that names
what was approximated or skipped (also kept in ``CaptionScores.notes`` for the run log):

* PTB tokenizer (Java): without Java, or if it fails, a simple regex tokenizer is used
  (lower-case, split off punctuation, drop the punctuation tokens PTB's wrapper drops).
  Scores are then close to, not equal to, the official ones.
* METEOR (Java): left out of the result when Java is missing or the scorer fails.
* SPICE (Java + Stanford CoreNLP 3.6.0 jars, which pycocoevalcap would download on first
  use): computed only when those jars are already present; never downloaded here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence


class CaptionMetricsWarning(UserWarning):
    """A caption metric was approximated or skipped."""


# The tokens pycocoevalcap's PTB wrapper removes after tokenising, plus the raw quotes that
# PTB first turns into `` or ''. Brackets survive: PTB (run with -lowerCase) emits "-lrb-",
# which the wrapper's upper-case "-LRB-" entry does not catch, so we emit it too.
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+(?=n't\b)|n't|'\w+|\w+(?:[-/]\w+)*|\.\.\.|--|[^\w\s]")


def simple_tokenize(caption: str) -> str:
    """Fallback for the PTB tokenizer: lower-case; words (hyphen/slash compounds kept
    whole), numbers and clitics ('s, n't) split from punctuation; drop the punctuation
    tokens the PTB wrapper drops; returns the tokens joined by single spaces."""
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(caption.lower()))
    return " ".join(t for t in tokens if t not in _DROPPED)


def _java() -> bool:
    return shutil.which("java") is not None


def _tokenize(gts: dict, res: dict, use_ptb: bool, notes: list | None = None) -> tuple[dict, dict]:
    """{id: [str]} -> {id: [tokenised str]} for GT and results, with one PTB (JVM) run
    when possible, else with ``simple_tokenize``."""
    if use_ptb:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
            both = {(side, k): [{"caption": c} for c in v]
                    for side, d in (("gts", gts), ("res", res)) for k, v in d.items()}
            out = PTBTokenizer().tokenize(both)
            if any(len(out.get(key, ())) != len(v) for key, v in both.items()):
                raise RuntimeError("it returned fewer lines than it was given")
            return ({k: out[("gts", k)] for k in gts}, {k: out[("res", k)] for k in res})
        except Exception as err:  # no Java, read-only package dir, crashed JVM, ...
            _warn([] if notes is None else notes,
                  f"PTB tokenizer failed ({err}); using the simple fallback tokenizer, so BLEU, METEOR, "
                  "ROUGE_L and CIDEr are approximate (not the official COCO numbers)")
    return ({k: [simple_tokenize(c) for c in v] for k, v in gts.items()},
            {k: [simple_tokenize(c) for c in v] for k, v in res.items()})


def spice_available() -> bool:
    """True when Java and the CoreNLP jars SPICE needs are installed (no download)."""
    try:
        import pycocoevalcap.spice as spice_pkg
    except ImportError:
        return False
    lib = os.path.join(os.path.dirname(spice_pkg.__file__), "lib")
    jars = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    return _java() and all(os.path.exists(os.path.join(lib, j)) for j in jars)


def _run(scorer_factory, name, gts, res, notes):
    """(corpus score, per-image scores) of a pycocoevalcap scorer, its prints silenced;
    (None, None) and a warning on failure."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            scorer = scorer_factory()
            return scorer.compute_score(gts, res)
    except Exception as err:
        _warn(notes, f"{name} skipped: the scorer failed ({type(err).__name__}: {err})")
        return None, None


@dataclasses.dataclass(frozen=True)
class CaptionScores:
    """`corpus`: {metric: value} as COCOEvalCap's `eval`; `per_image`: {id: {metric: value}}
    as its `imgToEval` (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE where computed);
    `notes`: one line per metric that was approximated or skipped (empty = official)."""

    corpus: dict
    per_image: dict
    notes: tuple = ()


def _warn(notes: list, message: str) -> None:
    notes.append(message)
    warnings.warn(message, CaptionMetricsWarning, stacklevel=3)


def caption_scores(gts: Mapping[object, Sequence[str]], res: Mapping[object, str | Sequence[str]],
                   *, tokenizer: str = "ptb", meteor: bool = True, spice: bool | None = None) -> CaptionScores:
    """Corpus and per-image caption metrics of ``res`` (one caption per id) against ``gts``.

    With Java this is pycocoevalcap's ``COCOEvalCap.evaluate()`` (PTB tokenizer on both
    sides, then BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE) on the same ids. Like it, every
    GT id must have a result and every result id must be in GT. ``tokenizer``: "ptb" (falls
    back with a warning) or "simple". ``spice``: None = when available, True = wanted (warns if
    unavailable), False = off. Whatever is approximated or skipped is warned about
    (``CaptionMetricsWarning``) and listed in ``notes``. Values are fractions.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    missing, extra = set(gts) - set(res), set(res) - set(gts)
    if missing or extra:
        raise ValueError(f"result ids must match GT ids: {len(missing)} GT ids without a result "
                         f"(e.g. {sorted(map(str, missing))[:5]}), {len(extra)} result ids not in "
                         f"GT (e.g. {sorted(map(str, extra))[:5]})")
    if tokenizer not in ("ptb", "simple"):
        raise ValueError(f"tokenizer must be 'ptb' or 'simple', not {tokenizer!r}")
    # Results in GT order: pycocoevalcap pairs per-image scores with the GT ids.
    res = {k: [res[k]] if isinstance(res[k], str) else list(res[k]) for k in gts}
    if any(len(v) != 1 for v in res.values()):
        raise ValueError("each result id needs exactly one caption")

    notes: list[str] = []
    java = _java()
    use_ptb = tokenizer == "ptb"
    if use_ptb and not java:
        _warn(notes, "java not found: the PTB tokenizer is replaced by the simple fallback tokenizer, "
                     "so BLEU, ROUGE_L and CIDEr are approximate (not the official COCO numbers); "
                     "install a Java runtime (e.g. apt-get install -y default-jre-headless)")
        use_ptb = False
    gts = {k: [v] if isinstance(v, str) else list(v) for k, v in gts.items()}
    gts_t, res_t = _tokenize(gts, res, use_ptb, notes)
    ids = list(gts_t)

    corpus: dict = {}
    per_image: dict = {k: {} for k in ids}

    def record(names, score, scores):
        if score is None:
            return
        if isinstance(names, str):
            names, score, scores = [names], [score], [scores]
        for name, sc, scs in zip(names, score, scores):
            corpus[name] = float(sc)
            for k, v in zip(ids, scs):
                per_image[k][name] = float(v) if not isinstance(v, Mapping) else v

    record([f"Bleu_{n}" for n in range(1, 5)], *_run(lambda: Bleu(4), "BLEU", gts_t, res_t, notes))
    if meteor and not java:
        _warn(notes, "java not found: METEOR skipped (it runs in a JVM)")
    elif meteor:
        record("METEOR", *_run(Meteor, "METEOR", gts_t, res_t, notes))
    record("ROUGE_L", *_run(Rouge, "ROUGE_L", gts_t, res_t, notes))
    record("CIDEr", *_run(Cider, "CIDEr", gts_t, res_t, notes))
    if spice or (spice is None and spice_available()):
        if spice_available():
            from pycocoevalcap.spice.spice import Spice
            record("SPICE", *_run(Spice, "SPICE", gts_t, res_t, notes))
        else:
            _warn(notes, "SPICE skipped: it needs java and the Stanford CoreNLP 3.6.0 jars in "
                         "pycocoevalcap/spice/lib (run pycocoevalcap's get_stanford_models once, online)")
    return CaptionScores(corpus=corpus, per_image=per_image, notes=tuple(notes))


def caption_metrics(gts: Mapping[object, Sequence[str]], res: Mapping[object, str | Sequence[str]],
                    *, tokenizer: str = "ptb", meteor: bool = True,
                    spice: bool | None = None) -> dict[str, float]:
    """Corpus caption metrics (``caption_scores(...).corpus``): keys Bleu_1..Bleu_4, METEOR,
    ROUGE_L, CIDEr, SPICE; skipped metrics are absent. BITA selects checkpoints on
    CIDEr + Bleu_4 (``agg_metrics``)."""
    return caption_scores(gts, res, tokenizer=tokenizer, meteor=meteor, spice=spice).corpus


def agg_metrics(corpus: Mapping[str, float]) -> float:
    """BITA's validation score: CIDEr + Bleu_4 (spec §7)."""
    return float(corpus["CIDEr"] + corpus["Bleu_4"])


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------
PER_IMAGE_KEYS = ("CIDEr", "Bleu_4")


def coco_gt(gts: Mapping[int, Sequence[str]]) -> dict:
    """A COCO caption GT dict (`images`, `annotations`) for pycocotools' COCO, from {id: refs}."""
    images = [{"id": int(k)} for k in gts]
    anns = [{"image_id": int(k), "id": 0, "caption": c} for k, refs in gts.items()
            for c in ([refs] if isinstance(refs, str) else refs)]
    for i, a in enumerate(anns):
        a["id"] = i + 1
    return {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": anns}


def write_captions(path: str | os.PathLike, rows: Sequence[Mapping], scores: CaptionScores | None = None,
                   keys: Sequence[str] = PER_IMAGE_KEYS) -> None:
    """Write the captions as JSON: a list of {"image_id", "file_name", "caption"} (one per row,
    in order), each with its per-image scores (`keys`, default CIDEr and Bleu_4) when `scores`
    is given. The file is also a valid COCO results file (pycocotools ignores extra fields)."""
    out = []
    for row in rows:
        item = {"image_id": int(row["image_id"]), "file_name": str(row.get("file_name", "")),
                "caption": str(row["caption"])}
        if scores is not None:
            per = scores.per_image.get(row["image_id"], scores.per_image.get(int(row["image_id"]), {}))
            item.update({k: per[k] for k in keys if k in per})
        out.append(item)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
