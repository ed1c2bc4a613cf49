"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) via pycocoevalcap,
as BITA reports them (spec BITA §7: both sides PTB-tokenised, then every scorer).

Java-backed parts degrade instead of failing, each with a ``CaptionMetricsWarning``:
* PTB tokenizer (Java): without Java, or if it fails, a simple regex tokenizer is used
  (lower-case, split off punctuation, drop the punctuation tokens PTB's wrapper drops).
  Scores are then close to, not equal to, the official ones.
* METEOR (Java): left out of the result when Java is missing or the scorer fails.
* SPICE (Java + Stanford CoreNLP 3.6.0 jars, which pycocoevalcap would download on first
  use): computed only when those jars are already present; never downloaded here.
"""
from __future__ import annotations

import contextlib
import io
import os
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


def _tokenize(gts: dict, res: dict, use_ptb: bool) -> tuple[dict, dict]:
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
            warnings.warn(f"PTB tokenizer failed ({err}); using the simple fallback tokenizer, "
                          "so scores are approximate", CaptionMetricsWarning, stacklevel=3)
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


def _run(scorer_factory, name, gts, res):
    """Score with a pycocoevalcap scorer, silencing its prints; None (and a warning) on failure."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            scorer = scorer_factory()
            score, _ = scorer.compute_score(gts, res)
        return score
    except Exception as err:
        warnings.warn(f"{name} skipped: {err}", CaptionMetricsWarning, stacklevel=3)
        return None


def caption_metrics(gts: Mapping[object, Sequence[str]], res: Mapping[object, str | Sequence[str]],
                    *, tokenizer: str = "ptb", meteor: bool = True,
                    spice: bool | None = None) -> dict[str, float]:
    """Corpus caption metrics of ``res`` (one caption per id) against ``gts`` (references).

    Like pycocoevalcap's ``COCOEvalCap`` every GT id must have a result and every result
    id must be in GT. ``tokenizer``: "ptb" (falls back with a warning) or "simple".
    ``spice``: None = when available, True = wanted (warns if unavailable), False = off.
    Returns fractions with keys Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE; skipped
    metrics are absent. BITA selects checkpoints on CIDEr + Bleu_4.
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
    res = {k: [v] if isinstance(v, str) else list(v) for k, v in res.items()}
    if any(len(v) != 1 for v in res.values()):
        raise ValueError("each result id needs exactly one caption")

    use_ptb = tokenizer == "ptb"
    if use_ptb and not _java():
        warnings.warn("java not found: PTB tokenizer replaced by the simple fallback, scores are "
                      "approximate", CaptionMetricsWarning, stacklevel=2)
        use_ptb = False
    gts = {k: [v] if isinstance(v, str) else list(v) for k, v in gts.items()}
    gts_t, res_t = _tokenize(gts, res, use_ptb)

    out = {}
    bleu = _run(lambda: Bleu(4), "BLEU", gts_t, res_t)
    if bleu is not None:
        out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor and not _java():
        warnings.warn("java not found: METEOR skipped", CaptionMetricsWarning, stacklevel=2)
    elif meteor:
        out["METEOR"] = _run(Meteor, "METEOR", gts_t, res_t)
    out["ROUGE_L"] = _run(Rouge, "ROUGE_L", gts_t, res_t)
    out["CIDEr"] = _run(Cider, "CIDEr", gts_t, res_t)
    if spice or (spice is None and spice_available()):
        if spice_available():
            from pycocoevalcap.spice.spice import Spice
            out["SPICE"] = _run(Spice, "SPICE", gts_t, res_t)
        else:
            warnings.warn("SPICE skipped: it needs java and the Stanford CoreNLP 3.6.0 jars in "
                          "pycocoevalcap/spice/lib (run pycocoevalcap's get_stanford_models once, "
                          "online)", CaptionMetricsWarning, stacklevel=2)
    return {k: float(v) for k, v in out.items() if v is not None}
