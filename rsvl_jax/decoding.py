"""Greedy, beam and top-k/top-p decoding for `rsvl_jax.models.opt.OPT` from a prefix of embeddings.

Each strategy is one `lax.while_loop` (prefill, then one token per iteration) with the
`KVCache` pytree threaded through, static shapes, and the loop ending early once every
sequence is done. The prefix is prefilled once per batch entry and shared by its beams; beams
live as `batch * num_beams` rows of the generated-token cache, and reordering them is a row
gather of that (small) part only.

Semantics follow HF `model.generate(inputs_embeds=..., attention_mask=...)`:

* The prefix must be **left**-padded: the next token is read from the last column (as HF does).
* Only new tokens are returned, padded with `pad_token_id` after the eos that ended them.
* Beam search reproduces HF's scorer: per step the top `max(2, 1 + #eos) * num_beams`
  candidates; an eos among the top `num_beams` ends a hypothesis (kept if among the best
  `num_beams`); its score is the summed log-probs (eos included) / length**length_penalty;
  `early_stopping=False` stops a batch entry when the best running beam cannot beat the worst
  kept hypothesis by the `cur_len` heuristic.

Two length conventions, chosen by `GenerationConfig.bos_placeholder`:

* `False`: installed transformers (5.x): lengths count generated tokens only.
* `True`: transformers 4.29, which BITA ran. `generate(inputs_embeds=...)` then starts from a
  placeholder `input_ids = [[bos]]` that counts towards `max_length`/`min_length` and towards
  the `BeamSearchScorer` lengths. Expressed in new tokens (`max_new_tokens = max_length - 1`,
  `min_new_tokens = min_length - 1`), the differences are: beams cut at the length limit are
  normalised by `1 + #tokens`; the early-stop heuristic divides the best *candidate* score
  (eos candidates included) by `#tokens + 1`; at the limit, eos candidates in the top
  `num_beams` *and* the `num_beams` best non-eos beams are all offered as hypotheses; and the
  placeholder is part of the repetition-penalty history. `GenerationConfig.bita()` is BITA's
  setting (spec §5): 5 beams, <= 21 new tokens, "\\n" (50118) as eos, banned for 4 tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models.opt import OPT, KVCache

NEG = -1.0e9  # HF's "very negative" score for masked beams


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    method: Literal["greedy", "beam", "sample"] = "greedy"
    max_new_tokens: int = 20
    min_new_tokens: int = 0  # eos banned while fewer tokens were generated
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 1
    repetition_penalty: float = 1.0  # HF's CTRL-style penalty on already generated tokens
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = off
    top_p: float = 1.0  # sampling only; 1.0 = off
    bos_placeholder: bool = False  # transformers<=4.29 length conventions (see module doc)
    bos_token_id: int = 2

    def __post_init__(self):
        if self.method not in ("greedy", "beam", "sample"):
            raise ValueError(f"unknown decoding method {self.method!r}")
        if self.method == "beam" and self.num_beams < 2:
            raise ValueError("beam search needs num_beams >= 2")
        if self.method != "beam" and self.num_beams != 1:
            raise ValueError(f"num_beams={self.num_beams} only makes sense with method='beam'")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))

    @classmethod
    def bita(cls, eos_token_id: int = 50118, *, pad_token_id: int = 1, bos_token_id: int = 2,
             num_beams: int = 5, max_length: int = 22, min_length: int = 5) -> "GenerationConfig":
        """BITA's captioning search (spec §5, quirk Q16): transformers-4.29 `generate` with
        num_beams 5, max_length 22 and min_length 5 counting the BOS placeholder, so at most
        21 new tokens and no "\\n" among the first 4; length_penalty 1, repetition_penalty 1."""
        return cls(method="beam", max_new_tokens=max_length - 1, min_new_tokens=max(min_length - 1, 0),
                   num_beams=num_beams, length_penalty=1.0, early_stopping=False, eos_token_ids=(eos_token_id,),
                   pad_token_id=pad_token_id, bos_placeholder=True, bos_token_id=bos_token_id)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens: jax.Array  # (B, max_new_tokens) int32, the eos that ended a sequence included, then pads
    scores: jax.Array  # (B,) beam: HF's sequence score; greedy/sample: summed log-probs of the chosen tokens
    lengths: jax.Array  # (B,) generated tokens including the final eos
    # Beam search only: every kept hypothesis, best first (HF's num_return_sequences=num_beams);
    # row 0 is (tokens, scores, lengths) above. None for greedy and sampling.
    beam_tokens: jax.Array | None = None  # (B, num_beams, max_new_tokens)
    beam_scores: jax.Array | None = None  # (B, num_beams)
    beam_lengths: jax.Array | None = None  # (B, num_beams)


# ----------------------------------------------------------------------------------------
# Logits processors (HF order: repetition penalty, min length, then the sampling warpers).
# ----------------------------------------------------------------------------------------
def _process(scores, step, history, cfg: GenerationConfig):
    """scores (N, V) float32; `history` (N, T) tokens so far (valid where column < step)."""
    n, v = scores.shape
    if cfg.repetition_penalty != 1.0:
        valid = jnp.arange(history.shape[1])[None, :] < step
        ids = jnp.where(valid, history, v)  # out of range -> dropped / filled below
        if cfg.bos_placeholder:
            ids = jnp.concatenate([jnp.full((n, 1), cfg.bos_token_id, ids.dtype), ids], axis=1)
        got = jnp.take_along_axis(scores, jnp.minimum(ids, v - 1), axis=1)
        pen = jnp.where(got < 0, got * cfg.repetition_penalty, got / cfg.repetition_penalty)
        rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids.shape)
        scores = scores.at[rows, ids].set(pen, mode="drop")
    if cfg.min_new_tokens > 0:
        eos = jnp.zeros((v,), bool).at[jnp.asarray(cfg.eos_token_ids)].set(True)
        scores = jnp.where(eos & (step < cfg.min_new_tokens), -jnp.inf, scores)
    return scores


def _warp(logits, cfg: GenerationConfig):
    """Temperature, top-k, top-p as HF's warpers (filtered tokens get -inf)."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as HF
        cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        drop_sorted = (cum <= 1.0 - cfg.top_p).at[:, -1].set(False)  # always keep the most likely
        rows = jnp.arange(logits.shape[0])[:, None]
        drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _is_eos(tokens, cfg: GenerationConfig):
    return jnp.isin(tokens, jnp.asarray(cfg.eos_token_ids, tokens.dtype))


# ----------------------------------------------------------------------------------------
# Model steps
# ----------------------------------------------------------------------------------------
def _prefill(model: OPT, prefix_embeds, prefix_mask, rows_per_entry: int, max_new: int):
    """Prefill the prefix once per batch entry; the continuations (beams) get their own
    `max_new`-slot buffers on top of it, sharing the prefix keys/values (`KVCache.fork`)."""
    b, p = prefix_embeds.shape[:2]
    cache = model.init_cache(b, p)
    h, cache = model.hidden_states(inputs_embeds=prefix_embeds, attention_mask=prefix_mask, cache=cache)
    return model.logits(h[:, -1]), cache.fork(rows_per_entry, max_new)  # LM head on the last column only


def _extend(model: OPT, tokens, cache: KVCache):
    h, cache = model.hidden_states(input_ids=tokens[:, None], cache=cache)
    return model.logits(h[:, 0]), cache


# ----------------------------------------------------------------------------------------
# Greedy and sampling
# ----------------------------------------------------------------------------------------
# Both searches are `select` (pick the next tokens from logits) and the loop
# `while not stop: logits = extend(tokens); select(logits)`, with the first select on the
# prefill logits peeled off. No model pass is wasted after the last token, and there is no
# `lax.cond` around the model, which made XLA copy the whole cache every step.
def _search_one(model, logits, cache, cfg: GenerationConfig, rng):
    b = logits.shape[0]
    t = cfg.max_new_tokens

    def select(s, logits):
        n = s["n"]
        scores = _process(logits, n, s["tokens"], cfg)
        if cfg.method == "sample":
            scores = _warp(scores, cfg)
            tok = jax.random.categorical(jax.random.fold_in(rng, n), scores, axis=-1)
        else:
            tok = jnp.argmax(scores, axis=-1)
        tok = tok.astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), tok[:, None], axis=1)[:, 0]
        live = ~s["done"]
        tok = jnp.where(live, tok, cfg.pad_token_id)
        done = s["done"] | _is_eos(tok, cfg)
        return dict(s, n=n + 1, stop=(n + 1 >= t) | jnp.all(done), tokens=s["tokens"].at[:, n].set(tok), done=done,
                    score=s["score"] + jnp.where(live, logp, 0.0), length=s["length"] + live)

    def body(s):
        logits, cache = _extend(model, s["tokens"][:, s["n"] - 1], s["cache"])
        return select(dict(s, cache=cache), logits)

    s = dict(n=jnp.int32(0), stop=jnp.bool_(False), cache=cache,
             tokens=jnp.full((b, t), cfg.pad_token_id, jnp.int32), done=jnp.zeros((b,), bool),
             score=jnp.zeros((b,), jnp.float32), length=jnp.zeros((b,), jnp.int32))
    s = jax.lax.while_loop(lambda s: ~s["stop"], body, select(s, logits))
    return GenerationOutput(s["tokens"], s["score"], s["length"])


# ----------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------
def _gather(x, idx):
    """x (B, K', ...) rows picked per batch entry by idx (B, K)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _top(scores, k):
    return jax.lax.top_k(scores, k)[1]


def _beam_search(model, logits, cache, cfg: GenerationConfig):
    b, v = logits.shape
    k, t, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    legacy = cfg.bos_placeholder
    # 4.29 took 2 * num_beams candidates and raised when more than num_beams were eos; the 5.x count
    # is the same for one eos id and never runs out of live candidates.
    n_cand = max(2, 1 + len(cfg.eos_token_ids)) * k
    if n_cand > k * v:
        raise ValueError(f"beam search needs vocab_size * num_beams >= {n_cand}")
    top_rank = jnp.arange(n_cand) < k
    norm = lambda length: jnp.asarray(length, jnp.float32) ** lp

    def select(s, logits):
        """One HF beam step from the logits of the running beams (B*K, V)."""
        n = s["n"]
        n_after = n + 1
        last = n_after >= t
        logp = jax.nn.log_softmax(logits, axis=-1)
        logp = _process(logp, n, s["run_seqs"].reshape(b * k, t), cfg)
        acc = (logp.reshape(b, k, v) + s["run_scores"][:, :, None]).reshape(b, k * v)
        cand_scores, flat = jax.lax.top_k(acc, n_cand)  # (B, C), sorted
        src, tok = flat // v, (flat % v).astype(jnp.int32)
        cand_seqs = _gather(s["run_seqs"], src).at[:, :, n].set(tok)
        eos = _is_eos(tok, cfg)
        hits = eos | last if not legacy else eos

        # Beams that go on: the best num_beams candidates that did not stop.
        run_pen = cand_scores + hits.astype(jnp.float32) * NEG
        sel = _top(run_pen, k)
        run_seqs, run_scores, run_src = _gather(cand_seqs, sel), _gather(run_pen, sel), _gather(src, sel)

        fin = (s["fin_seqs"], s["fin_scores"], s["fin_flags"], s["fin_lens"])
        active = s["active"]
        if not legacy:
            # transformers 5.x `_update_finished_beams` / `_check_early_stop_heuristic`, same float32 arithmetic
            just = hits & top_rank[None]
            new = cand_scores / norm(n_after)
            if cfg.early_stopping is True:
                new = new + (jnp.all(fin[2], axis=1, keepdims=True)).astype(jnp.float32) * NEG
            new = new + (~active[:, None]).astype(jnp.float32) * NEG
            new = new + (~just).astype(jnp.float32) * NEG
            fin = _merge(fin, (cand_seqs, new, just, jnp.full_like(tok, n_after)), k)
            best_len = t if (cfg.early_stopping == "never" and lp > 0) else n_after
            best = run_scores[:, :1] / norm(best_len)
            worst = jnp.where(fin[2], jnp.min(fin[1], axis=1, keepdims=True), NEG)
            active = active & jnp.any(best > worst, axis=1)
            stop = ~jnp.any(active) | jnp.all(hits)
            if cfg.early_stopping is True:
                stop = stop | jnp.all(fin[2])
        else:
            # transformers 4.29 `BeamSearchScorer.process` / `BeamHypotheses` / `finalize`
            add = eos & top_rank[None] & active[:, None]
            new = jnp.where(add, cand_scores / norm(n_after), -jnp.inf)  # hyp length = placeholder + n
            fin = _merge(fin, (cand_seqs, new, add, jnp.full_like(tok, n_after)), k)
            enough = jnp.sum(fin[2], axis=1) >= k
            if cfg.early_stopping is True:
                done = enough
            else:
                cur = t + 1 if (cfg.early_stopping == "never" and lp > 0) else n_after + 1
                worst = jnp.min(jnp.where(fin[2], fin[1], jnp.inf), axis=1)
                done = enough & (worst >= cand_scores[:, 0] / norm(cur))
            active = active & ~done
            # at the length limit, `finalize` offers the running beams of unfinished entries
            offer = active[:, None] & last
            fin = _merge(fin, (run_seqs, jnp.where(offer, run_scores / norm(t + 1), -jnp.inf), offer,
                               jnp.full_like(sel, t)), k)
            stop = ~jnp.any(active) | last

        rows = (jnp.arange(b)[:, None] * k + run_src).reshape(-1)
        return dict(n=n_after, stop=stop, cache=s["cache"].take(rows), run_seqs=run_seqs, run_scores=run_scores,
                    fin_seqs=fin[0], fin_scores=fin[1], fin_flags=fin[2], fin_lens=fin[3], active=active)

    def body(s):
        logits, cache = _extend(model, s["run_seqs"][:, :, s["n"] - 1].reshape(-1), s["cache"])
        return select(dict(s, cache=cache), logits)

    fin_init = jnp.float32(NEG) if not legacy else -jnp.inf
    s = dict(
        n=jnp.int32(0), stop=jnp.bool_(False), cache=cache,
        run_seqs=jnp.full((b, k, t), cfg.pad_token_id, jnp.int32),
        run_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 starts live
        fin_seqs=jnp.full((b, k, t), cfg.pad_token_id, jnp.int32),
        fin_scores=jnp.full((b, k), fin_init, jnp.float32),
        fin_flags=jnp.zeros((b, k), bool), fin_lens=jnp.zeros((b, k), jnp.int32),
        active=jnp.ones((b,), bool),
    )
    s = jax.lax.while_loop(lambda s: ~s["stop"], body, select(s, jnp.repeat(logits, k, axis=0)))
    return GenerationOutput(s["fin_seqs"][:, 0], s["fin_scores"][:, 0], s["fin_lens"][:, 0],
                            s["fin_seqs"], s["fin_scores"], s["fin_lens"])


def _merge(old, new, k):
    """Keep the k best of the old and new hypotheses (seqs, scores, flags, lengths), best first."""
    cat = [jnp.concatenate([a, b_], axis=1) for a, b_ in zip(old, new)]
    idx = _top(cat[1], k)
    return tuple(_gather(x, idx) for x in cat)


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------
def decode(model: OPT, prefix_embeds, prefix_mask=None, config: GenerationConfig = GenerationConfig(), rng=None
           ) -> GenerationOutput:
    """Traceable decoding (call inside your own jit, e.g. a BITA eval step).

    prefix_embeds (B, P, embed_dim) left-padded, prefix_mask (B, P) (None: all ones).
    """
    b, p = prefix_embeds.shape[:2]
    mask = jnp.ones((b, p), jnp.int32) if prefix_mask is None else jnp.asarray(prefix_mask, jnp.int32)
    if config.method == "sample" and rng is None:
        raise ValueError("sampling needs an rng key")
    logits, cache = _prefill(model, prefix_embeds, mask, config.num_beams, config.max_new_tokens)
    if config.method == "beam":
        return _beam_search(model, logits, cache, config)
    return _search_one(model, logits, cache, config, rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate_jit(graphdef, params, rest, prefix_embeds, prefix_mask, rng, config):
    return decode(nnx.merge(graphdef, params, rest), prefix_embeds, prefix_mask, config, rng)


def generate(model: OPT, prefix_embeds, prefix_mask=None, config: GenerationConfig = GenerationConfig(), rng=None
             ) -> GenerationOutput:
    """Jitted `decode` (compiled once per model structure, config and input shapes)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _generate_jit(graphdef, params, rest, prefix_embeds, prefix_mask, rng, config=config)


def make_generate(model: OPT, config: GenerationConfig):
    """`fn(prefix_embeds, prefix_mask=None, rng=None) -> GenerationOutput` with the model split once
    (for evaluation loops: no per-call graph traversal). Weights are captured as they are now."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(prefix_embeds, prefix_mask=None, rng=None):
        return _generate_jit(graphdef, params, rest, prefix_embeds, prefix_mask, rng, config=config)

    return fn
