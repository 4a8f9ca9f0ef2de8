"""Drafts: what proposes tokens for the target to verify.

Two proposers share one interface (``keep``/``add`` rows as sequences leave and join, ``propose`` up to a cap
per row, ``commit`` what the target accepted, ``rewind`` to repeat a round when timing it, ``backlog``: what the
next round reads first beyond a round's own ``ROUND_READS``):

- ``DraftLMProposer``: a small LM with the target's tokenizer, one sequential single-token step per draft token. Its cache may
  lag the committed tokens; each round it first catches up on what it has not read (the anchor, and the last
  draft when every draft was accepted) and rolls back rows it drafted that the target rejected. Its confidence in
  a draft is the probability its own law gives its likeliest token there (a function of the tokens before it
  only, so schedulers may use it); a row stops drafting once the product of its confidences falls below
  ``STOP_SURVIVAL``.
- ``BlockProposer``: a DSpark or DFlash drafter. One call drafts the whole block from the target's tapped
  features. Its only state is a cache of context K/V, one entry per committed position, fed exactly once from
  the features of the anchor and accepted drafts (spec §4.4), so it never rolls back.

``LookupProposer`` wraps either (or none): a row whose last tokens occurred earlier in its own prompt or output
proposes what followed them there (prompt lookup), at no graph cost; the other rows get the wrapped draft, or,
with no draft, what followed their last tokens in the bundle's lookup store of earlier answers (``store``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.decoder import commit, decoder_cache, feed, run_decoder
from dspark.runtime.sampling import probabilities, sample
from dspark.runtime.store import load_store


@dataclass
class Proposal:
    tokens: list[int]
    # [len(tokens), V]: the law each token was drawn from; None when greedy or a point mass (prompt lookup)
    probs: np.ndarray | None = None
    confidence_logits: np.ndarray | None = None  # [len(tokens)] raw confidence-head logits (None: no head)
    sts: bool = True  # whether the bundle's STS temperatures (fitted to the drafter's head) apply to them

    def truncated(self, n: int) -> "Proposal":
        cut = lambda x: None if x is None else x[:n]  # noqa: E731
        return Proposal(self.tokens[:n], cut(self.probs), cut(self.confidence_logits), self.sts)


def draft_index(draft_vocab, target_vocab: int) -> np.ndarray:
    """Target id -> draft id for a draft LM over a reduced vocabulary: a token's position in ``draft_vocab``, or
    N = len(draft_vocab) for every target token outside it."""
    index = np.full(target_vocab, len(draft_vocab), dtype=np.int64)
    index[np.asarray(draft_vocab, dtype=np.int64)] = np.arange(len(draft_vocab))
    return index


class DraftVocabulary:
    """What a draft's law is over: the target's vocabulary, or a reduced one (``draft_vocab``, the target ids of the
    draft's ids 0..N-1; a draft LM has id N for every other token, which it never drafts)."""

    def __init__(self, bundle: Bundle, width: int):
        self.target_vocab = bundle.target.config.vocab_size
        self.ids = None if width == self.target_vocab else np.asarray(bundle.draft.draft_vocab, dtype=np.int64)
        if self.ids is not None and len(self.ids) != width:
            raise DsparkError(f"{bundle.path}: the draft's law covers {width} tokens but the manifest lists "
                              f"{len(self.ids)} draft-vocabulary ids; re-export the bundle")
        # target id -> draft id, for a draft LM's inputs
        self.index = None if self.ids is None else draft_index(self.ids, self.target_vocab)

    def draft_ids(self, tokens: list[int]) -> list[int]:
        return tokens if self.index is None or not tokens else self.index[tokens].tolist()

    def target_id(self, draft_id: int) -> int:
        return draft_id if self.ids is None else int(self.ids[draft_id])

    def target_law(self, law: np.ndarray) -> np.ndarray:
        """Draft laws [..., N] over the draft vocabulary as laws over the target's [..., V], fp64."""
        if self.ids is None:
            return law.astype(np.float64)
        full = np.zeros((*law.shape[:-1], self.target_vocab))
        full[..., self.ids] = law
        return full


class DraftLMProposer:
    reads_features = False  # whether ``add`` takes the newcomers' tapped target features
    has_confidence = True  # whether proposals carry confidence logits
    # a draft whose chance of being reached and accepted is under this rarely pays for its draft step and verify slot
    STOP_SURVIVAL = 0.1
    ROUND_READS = 1  # tokens a round reads before drafting, each row: the anchor (as profile.py times a round)

    def __init__(self, bundle: Bundle, runner, draft_length: int):
        self.bundle = bundle
        self.runner = runner("draft")
        self.draft_length = draft_length
        self.cache = decoder_cache(bundle.draft.config, 0, bundle, device=self.runner.cache_device)
        # a reduced draft LM's graph reads and scores its own ids: N drafted ones, then the id of every other token
        self.width = bundle.draft.config.vocab_size - (1 if bundle.draft.draft_vocab else 0)
        self.vocab = DraftVocabulary(bundle, self.width)

    def keep(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)

    def add(self, count: int, features=None) -> None:
        self.cache.add_rows(self.cache.empty_like(count))

    def backlog(self, seqs) -> int:
        """Committed tokens the next round reads first beyond ``ROUND_READS``, on the widest row (one call pads the
        others to it): a new row's prompt, and one token for each round the row sat out."""
        unread = max((len(s.tokens) - n for s, n in zip(seqs, self.cache.lens)), default=0)
        return max(0, unread - self.ROUND_READS)

    def propose(self, seqs, caps: list[int]) -> list[Proposal]:
        cache, chunk = self.cache, self.bundle.limits.prefill_chunk
        if not any(caps):
            return [Proposal([], None, np.zeros(0)) for _ in seqs]
        # its confidences are its own probabilities (STS temperatures apply once 'dspark calibrate' fitted them; its
        # stop rule reads them raw)
        proposals = [Proposal([], None if s.request.sampling.greedy else [], []) for s in seqs]
        # first step: catch up on every committed token this draft has not read
        pending = [self.vocab.draft_ids(s.tokens[cache.lens[r] :]) if caps[r] else [] for r, s in enumerate(seqs)]
        logits = feed(self.runner, cache, pending, chunk)
        caps, survival = list(caps), [1.0] * len(seqs)
        for step in range(max(caps)):
            for r, s in enumerate(seqs):
                if step < caps[r]:
                    survival[r] *= self._draw(s, proposals[r], logits[r])
                    if survival[r] < self.STOP_SURVIVAL:
                        caps[r] = step + 1
            if step + 1 == max(caps):
                break
            parts = [self.vocab.draft_ids(proposals[r].tokens[-1:]) if step + 1 < caps[r] else []
                     for r in range(len(seqs))]
            out = run_decoder(self.runner, cache, parts)
            commit(cache, out, [len(p) for p in parts])
            logits = list(out["logits"][:, 0])
        for p in proposals:
            p.probs = np.stack(p.probs) if p.probs else None
            p.confidence_logits = np.asarray(p.confidence_logits, dtype=np.float64)
        return proposals

    def _draw(self, seq, proposal: Proposal, logits: np.ndarray) -> float:
        """Draft one token from ``logits`` and record it with its confidence logit; returns the confidence: the
        likeliest token's probability under the law drafted from (T = 1 when greedy)."""
        params, logits = seq.request.sampling, logits[: self.width]
        if params.greedy:
            best = int(logits.argmax())
            proposal.tokens.append(self.vocab.target_id(best))
            others = np.exp(logits.astype(np.float64) - logits[best]).sum() - 1.0  # (1 - p) / p of the likeliest
        else:
            q = probabilities(logits, params)
            proposal.tokens.append(self.vocab.target_id(sample(q, seq.rng.random())))
            proposal.probs.append(self.vocab.target_law(q))
            top = q.max()
            others = (1.0 - top) / top
        proposal.confidence_logits.append(-np.log(max(others, 1e-300)))
        return 1.0 / (1.0 + others)

    def rewind(self, anchors: list[int]) -> None:
        """Forget what each row read past its anchor, so the next ``propose`` redoes the same round."""
        self.cache.lens[:] = anchors

    def commit(self, anchors: list[int], drafted: list[int], _verified, accepted: list[int], _out) -> None:
        """Keep the cache rows that hold committed tokens: the anchor and the accepted drafts it has read."""
        for r, n in enumerate(drafted):
            if n:
                self.cache.lens[r] = anchors[r] + 1 + min(accepted[r], n - 1)


class BlockProposer:
    reads_features = True
    # target features a round reads into context before drafting, each row: the anchor's and one accepted draft's
    # (the SmolLM2 drafters accept 1.2-2 drafts a round), as profile.py times a round
    ROUND_READS = 2

    def __init__(self, bundle: Bundle, runner, draft_length: int):
        self.bundle = bundle
        self.has_confidence = bundle.draft.confidence_head
        self.context = runner("draft_context")
        self.drafter = runner("draft_propose")
        self.draft = bundle.draft
        self.draft_length = draft_length
        self.cache = decoder_cache(self.draft.config, 0, bundle)
        self.pending: list[list[np.ndarray]] = []  # per row: target feature rows not yet in the context cache
        self.feature_width = self.draft.config.hidden_size * len(self.draft.target_layer_ids)
        # the graph's law is over the drafter's vocabulary: the target's (bundles before 0.4.3 scattered a reduced
        # one into it in the graph) or its reduced subset, placed in the target's only for sampled rows
        width = next(s.shape[-1] for s in bundle.graph("draft_propose").outputs if s.name == "draft_probs")
        self.vocab = DraftVocabulary(bundle, width)

    def keep(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.pending = [self.pending[r] for r in rows]

    def add(self, count: int, features: list[list[np.ndarray]]) -> None:
        self.cache.add_rows(self.cache.empty_like(count))
        self.pending += features

    def backlog(self, seqs) -> int:
        """Target features the next round reads first beyond ``ROUND_READS``, on the widest row (one context call
        pads the others to it): a new row's prompt, and one feature for each round the row sat out."""
        unread = max((sum(len(f) for f in p) for p in self.pending), default=0)
        return max(0, unread - self.ROUND_READS)

    def _flush_context(self) -> None:
        """Turn pending feature rows into context K/V at each row's next positions."""
        rows = [np.concatenate(p) if p else None for p in self.pending]
        chunk, width = self.bundle.graph("draft_context").dims["context"][1], self.feature_width
        offset = 0
        while any(r is not None and len(r) > offset for r in rows):
            parts = [r[offset : offset + chunk] if r is not None else r for r in rows]
            counts = [0 if p is None else len(p) for p in parts]
            feats = np.zeros((len(rows), max(counts), width), dtype=self.cache.k.dtype)
            for i, part in enumerate(parts):
                if counts[i]:
                    feats[i, : counts[i]] = part
            positions = self.cache.lens[:, None] + np.arange(feats.shape[1], dtype=np.int64)[None, :]
            out = self.context.run({"features": feats, "positions": positions})
            self.cache.append(out["ctx_k"], out["ctx_v"], counts)
            offset += chunk
        self.pending = [[] for _ in rows]

    def propose(self, seqs, caps: list[int]) -> list[Proposal]:
        has_head = self.has_confidence
        if not any(caps):
            return [Proposal([], None, np.zeros(0) if has_head else None) for _ in seqs]
        self._flush_context()
        # the graph drafts the bundle's whole draft length; each row keeps its cap
        noise = np.zeros((len(seqs), self.draft.draft_length), dtype=np.float32)
        for r, s in enumerate(seqs):
            if caps[r] and not s.request.sampling.greedy:
                noise[r] = s.rng.random(noise.shape[1])
        out = self.drafter.run(
            {
                "anchor": np.array([s.tokens[-1] for s in seqs], dtype=np.int64),
                "start": np.array([len(s.tokens) - 1 for s in seqs], dtype=np.int64),
                "cache_lens": self.cache.lens.copy(),
                "past_k": self.cache.k,
                "past_v": self.cache.v,
                "temperature": np.array([s.request.sampling.temperature for s in seqs], dtype=np.float32),
                "noise": noise,
            }
        )
        proposals = []
        for r, s in enumerate(seqs):
            n = caps[r]
            probs = None if s.request.sampling.greedy or not n else self.vocab.target_law(out["draft_probs"][r, :n])
            conf = out["confidence_logits"][r, :n].astype(np.float64) if has_head else None
            proposals.append(Proposal([int(t) for t in out["draft_tokens"][r, :n]], probs, conf))
        return proposals

    def rewind(self, anchors: list[int]) -> None:
        """Forget the context at and past each row's anchor, and features not yet read. A proposal reads the context
        cache without writing it, so a round repeats as it was unless the context is cut back and its features
        committed again (which is how a timed round includes reading them)."""
        self.cache.lens[:] = np.minimum(self.cache.lens, anchors)
        self.pending = [[] for _ in self.pending]

    def commit(self, anchors: list[int], _drafted, _verified, accepted: list[int], out) -> None:
        """Features of the anchor and the accepted drafts become the next round's context."""
        for r in range(len(anchors)):
            self.pending[r].append(out["hidden"][r, : accepted[r] + 1].copy())


class LookupProposer:
    """Prompt lookup over another proposer (or none): for each row, the most recent earlier occurrence of its last
    ``max_match`` .. ``min_match`` tokens (longest first) in its own tokens, prompt and output, proposes the tokens
    that followed it. Other rows get the wrapped proposer's draft; without one, the bundle's lookup store
    (``store.TokenStore``: text the target wrote before) proposes what most often followed them there.

    The store does not stand in front of a trained draft: it matches almost every row, its drafts are worse than
    the draft's, and taking them where it matches cost more than the draft calls it saved. SmolLM2-135M fp32, 16
    held-out prompts x 64 greedy tokens, store of 1.44 M tokens: the 2-layer DSpark drafter with own-token lookup
    took 399 rounds, with the store in between 431 (τ 2.57 against 2.38), and timed in one bench run the C++
    host's lookup, which had no store then, ran 1.55x over plain against the Python runtime's 1.46x; a draft LM
    with the store in between ran 1.54x / 1.72x (fixed / sps) against 1.88x / 1.86x alone
    (examples/smollm2-draft-lm).

    A lookup draft is deterministic: its law is a point mass, so a sampled row accepts it with the target's
    probability of that token and otherwise samples the target's law without it (exact, as for any draft). Its
    confidence at draft position k is the acceptance rate of drafts from the same source (own tokens or store) at
    k, given positions before k were accepted, over this proposer's recent drafts: counts that start at ``PRIOR``
    worth ``PRIOR_ROUNDS`` drafts (the rate measured for own-token lookup on SmolLM2-135M-Instruct's answers) and
    fade by ``FADE`` per draft of that source, verified or not, so the rates follow a changing text and one that
    fell too low for drafts to be verified drifts back up until they are tried again. It depends on past rounds
    only, never on what is drafted now, so schedulers stay non-anticipating; with ``sps`` a lookup draft is
    verified only as far as its expected gain pays for the wider verify call on this machine."""

    PRIOR, PRIOR_ROUNDS, FADE = 0.85, 4.0, 0.97
    OWN, STORE = 0, 1  # where a row's draft came from this round (None: the wrapped proposer, or nothing)

    def __init__(self, bundle: Bundle, inner, draft_length: int, min_match: int = 2, max_match: int = 4):
        if min_match < 1 or max_match < min_match:
            raise DsparkError(f"prompt lookup matches {min_match}..{max_match} tokens: need 1 <= min <= max")
        self.inner = inner
        self.draft_length = draft_length
        self.min_match, self.max_match = min_match, max_match
        self.store = load_store(bundle, min_match, max_match) if inner is None else None
        self.reads_features = inner is not None and inner.reads_features
        # lookup rows carry a confidence wherever the other rows do (or there are no others)
        self.has_confidence = inner is None or inner.has_confidence
        self.sources: list[int | None] = []  # per row, where this round's draft came from
        # per source and draft position: verified drafts whose earlier positions were all accepted, and of them
        # the accepted ones
        self.trials = np.zeros((2, draft_length))
        self.hits = np.zeros((2, draft_length))

    def confidence_logits(self, source: int, n: int) -> np.ndarray:
        """Logits of the per-position acceptance rates counted so far, for an n-token draft from ``source``."""
        rate = (self.hits[source, :n] + self.PRIOR * self.PRIOR_ROUNDS) / (self.trials[source, :n] + self.PRIOR_ROUNDS)
        return np.log(rate / (1 - rate))

    def lookup(self, tokens: list[int], cap: int) -> list[int]:
        """The continuation of the most recent, longest earlier occurrence of ``tokens``' last tokens."""
        history = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_match, len(history) - 1), self.min_match - 1, -1):
            # windows that end before the last token, so each has at least one token after it
            windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
            hits = np.flatnonzero((windows == history[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return history[start : start + cap].tolist()
        return []

    def draft(self, tokens: list[int], cap: int) -> tuple[list[int], int | None]:
        """A row's lookup draft and its source: its own tokens first, then the store (when there is one)."""
        if not cap:
            return [], None
        found = self.lookup(tokens, cap)
        if found:
            return found, self.OWN
        found = self.store.continuation(tokens, cap) if self.store else []
        return found, (self.STORE if found else None)

    def keep(self, rows: list[int]) -> None:
        if self.inner:
            self.inner.keep(rows)

    def add(self, count: int, features=None) -> None:
        if self.inner:
            self.inner.add(count, features)

    def rewind(self, anchors: list[int]) -> None:
        if self.inner:
            self.inner.rewind(anchors)

    def backlog(self, seqs) -> int:
        return self.inner.backlog(seqs) if self.inner else 0

    def propose(self, seqs, caps: list[int]) -> list[Proposal]:
        drafts = [self.draft(s.tokens, c) for s, c in zip(seqs, caps)]
        found, self.sources = [d for d, _ in drafts], [source for _, source in drafts]
        rest = [0 if f else c for f, c in zip(found, caps)]
        if self.inner:
            proposals = self.inner.propose(seqs, rest)
        else:
            proposals = [Proposal([]) for _ in seqs]
        for r, (tokens, source) in enumerate(zip(found, self.sources)):
            if not tokens:
                continue
            confidence = self.confidence_logits(source, len(tokens)) if self.has_confidence else None
            proposals[r] = Proposal(tokens, None, confidence, sts=False)  # a point-mass law (sampling.accept)
        return proposals

    def commit(self, anchors: list[int], drafted: list[int], verified: list[int], accepted: list[int], out) -> None:
        """Count the looked-up rows' outcomes; the wrapped proposer drafted nothing on them this round: it is told
        so. A round's drafts of one source fade the counts together, so the rates do not depend on the order of
        the rows (the C++ host orders a batch's rows its own way)."""
        for source in (self.OWN, self.STORE):
            outcomes = [(n, a) for s, n, a in zip(self.sources, verified, accepted) if s == source]
            if not outcomes:
                continue
            self.trials[source] *= self.FADE ** len(outcomes)
            self.hits[source] *= self.FADE ** len(outcomes)
            for n, a in outcomes:
                self.trials[source, : min(a + 1, n)] += 1  # positions up to the first rejection (if verified)
                self.hits[source, :a] += 1
        if self.inner:
            inner = [0 if source is not None else n for source, n in zip(self.sources, drafted)]
            self.inner.commit(anchors, inner, verified, accepted, out)


def choose_draft_length(bundle: Bundle, requested: int | None) -> int:
    """Draft tokens per round: ``requested`` or the bundle's, refused when the verify graph cannot take it."""
    if requested is not None and requested < 1:
        raise DsparkError(f"--num-draft-tokens {requested}: draft at least 1 token a round (or decode plainly with "
                          "--no-draft)")
    draft_length = requested or (bundle.draft.draft_length if bundle.draft else bundle.limits.max_verify_tokens - 1)
    if draft_length < 1:
        raise DsparkError("prompt lookup on a bundle without a draft needs room to verify drafts: re-export it with "
                          "--num-draft-tokens K")
    if draft_length + 1 > bundle.limits.max_verify_tokens:
        raise DsparkError(
            f"--num-draft-tokens {draft_length} needs {draft_length + 1}-token verify calls; this bundle was exported "
            f"for at most {bundle.limits.max_verify_tokens - 1} (re-export with --num-draft-tokens {draft_length})"
        )
    return draft_length


def make_proposer(bundle: Bundle, runner, draft_length: int | None, use_draft: bool = True, lookup: int = 0):
    """What drafts for ``bundle``: its draft (``use_draft``), with prompt lookup for rows whose last ``lookup`` or
    more tokens occurred before (0: no lookup), drafting ``draft_length`` tokens a round (None: the bundle's);
    None when nothing drafts. ``runner(graph)`` makes its graph runners (``backends.make_runner`` bound to a
    backend)."""
    use_draft = use_draft and bundle.draft is not None
    if not use_draft and not lookup:
        return None
    draft_length = choose_draft_length(bundle, draft_length)
    inner = None
    if use_draft:
        inner = (BlockProposer if bundle.draft.block else DraftLMProposer)(bundle, runner, draft_length)
    return LookupProposer(bundle, inner, draft_length, lookup, max(lookup, 4)) if lookup else inner
