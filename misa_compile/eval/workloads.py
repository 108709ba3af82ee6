"""Seeded indexer workloads (q [B,S,H,D], k [B,T,D], w [B,S,H]) for measuring selection quality.

Random isotropic q/k/w make every router look bad: no head carries more signal than another. The
"structured" setting gives the data the structure real lightning indexers show (ALGORITHM.md §5):

- Topic heads: each head has a topic direction; the context is a run of segments, each about one
  dominant topic (plus a weaker second one), so keys are mixtures of topic directions and a head
  cares about the stretches of context that carry its topic. Topic popularity is skewed, so some
  heads find much more to attend to than others.
- Query interest: every query is interested in the topic of the segment it sits in and in one
  earlier topic (the "question"); heads of those topics get stronger queries and larger weights.
- Important heads: a few heads (retrieval heads) have much larger |w| than the rest.
- Signed weights of varying magnitude: log-normal magnitudes, and a fraction of heads whose weight
  is negative (they push their topic's keys down).
- Recency: local heads carry rotary (RoPE-like) components, so their score falls with the distance
  between query and key; a slow frequency spans the whole context, a faster one a local window.
- Attention sink: the first keys share a sink direction that every head's queries lean towards.
- Needle: a key planted at a chosen depth (in every sequence of the batch), aligned with one
  head's query direction for the queries that look for it, scaled until it out-scores every other
  visible key by a margin for those queries (that head dominates the needle's score).

The queries are the last S positions of a context of T keys (end-aligned causal visibility, as in
the ops' `causal=True`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

SETTINGS = ("structured", "isotropic")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Structure:
    """Knobs of the structured setting; the defaults are the ones every report uses.

    important_heads:  heads with large |w| (at least one); 0 picks max(1, H // 8).
    important_weight: |w| multiplier of the important heads.
    weight_spread:    sigma of the log-normal |w| of the heads (larger: a few heads dominate).
    negative_fraction: fraction of the other heads whose weight is negative.
    local_fraction:   fraction of heads driven by recency instead of a topic.
    interest_boost:   extra query strength and |w| (times the base) of the heads whose topic
                      the query is interested in.
    segment_length:   mean length, in keys, of a run of context about one topic.
    recency_window:   keys over which the fast rotary component of local heads falls off.
    sink_keys:        leading keys that carry the attention-sink direction.
    key_noise, query_noise: isotropic noise added to every key / query (relative to the signal).
    needle_margin:    a needle's dense score is made at least this many times the best other key's.
    """

    important_heads: int = 0
    important_weight: float = 4.0
    weight_spread: float = 0.8
    negative_fraction: float = 0.25
    local_fraction: float = 0.125
    interest_boost: float = 4.0
    segment_length: int = 128
    recency_window: int = 256
    sink_keys: int = 4
    key_noise: float = 0.35
    query_noise: float = 0.25
    needle_margin: float = 1.5

    def __post_init__(self) -> None:
        for name in ("negative_fraction", "local_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Structure.{name}={value}: must be in [0, 1]")
        for name in ("important_weight", "segment_length", "recency_window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Structure.{name}={getattr(self, name)}: must be > 0")
        for name in ("important_heads", "sink_keys"):
            if getattr(self, name) < 0:
                raise ValueError(f"Structure.{name}={getattr(self, name)}: must be >= 0")
        for name in ("weight_spread", "interest_boost", "key_noise", "query_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"Structure.{name}={getattr(self, name)}: must be >= 0")
        if not self.needle_margin > 1:
            raise ValueError(f"Structure.needle_margin={self.needle_margin}: must be > 1 (the "
                             "needle must out-score every other key)")


@dataclass(frozen=True)
class NeedleSpec:
    """A needle at `depth` (0 = first key, 1 = the last key every query sees) retrieved by the
    last `queries` queries through `head` (None: the first important head)."""

    depth: float
    head: Optional[int] = None
    queries: int = 1


@dataclass(frozen=True)
class PlantedNeedle:
    position: int          # key index in [0, T)
    head: int              # the head whose query direction the needle matches
    query_rows: tuple      # query indices (into S) that look for it
    batch: int             # batch row it was planted in
    margin: float          # min over its queries of needle score / best other visible key score


@dataclass
class Workload:
    q: Tensor
    k: Tensor
    w: Tensor
    setting: str
    seed: int
    needles: list = field(default_factory=list)

    @property
    def shape(self) -> dict:
        batch, queries, heads, dim = self.q.shape
        return dict(batch=batch, queries=queries, keys=self.k.shape[1], heads=heads, dim=dim)


def make_workload(setting: str, *, batch: int = 1, queries: int, keys: int, heads: int, dim: int,
                  seed: int = 0, dtype: torch.dtype | str = torch.float32,
                  device: torch.device | str = "cpu", needle: Optional[NeedleSpec] = None,
                  structure: Structure = Structure()) -> Workload:
    """The named setting: "structured" (see the module docstring) or "isotropic" (plain randn)."""
    if setting == "structured":
        return structured_workload(batch=batch, queries=queries, keys=keys, heads=heads, dim=dim,
                                   seed=seed, dtype=dtype, device=device, needle=needle,
                                   structure=structure)
    if setting == "isotropic":
        if needle is not None:
            raise ValueError("make_workload: a needle needs the 'structured' setting (an isotropic "
                             "workload has no head directions to align a needle with)")
        return isotropic_workload(batch=batch, queries=queries, keys=keys, heads=heads, dim=dim,
                                  seed=seed, dtype=dtype, device=device)
    raise ValueError(f"make_workload: setting={setting!r}; allowed: {SETTINGS}")


def isotropic_workload(*, batch: int = 1, queries: int, keys: int, heads: int, dim: int,
                       seed: int = 0, dtype: torch.dtype | str = torch.float32,
                       device: torch.device | str = "cpu") -> Workload:
    """Plain standard-normal q, k and signed w: the contrast case with no head structure."""
    _check_sizes(batch, queries, keys, heads, dim, minimum_dim=1)
    dtype = _resolve_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=gen)
    k = torch.randn(batch, keys, dim, generator=gen)
    w = torch.randn(batch, queries, heads, generator=gen)
    return Workload(q=q.to(device, dtype), k=k.to(device, dtype), w=w.to(device, dtype),
                    setting="isotropic", seed=seed)


def structured_workload(*, batch: int = 1, queries: int, keys: int, heads: int, dim: int,
                        seed: int = 0, dtype: torch.dtype | str = torch.float32,
                        device: torch.device | str = "cpu", needle: Optional[NeedleSpec] = None,
                        structure: Structure = Structure()) -> Workload:
    """A workload with the structure of real indexers (module docstring). Generated in float32
    on the CPU from `seed` (identical on every device), then moved to `device` and `dtype`.
    `needle` is planted once in every sequence of the batch (Workload.needles, one per row)."""
    _check_sizes(batch, queries, keys, heads, dim, minimum_dim=_MIN_STRUCTURED_DIM)
    dtype = _resolve_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    basis = _Basis(dim, heads, gen)
    heads_info = _HeadRoles(heads, structure, basis.topics.shape[0], gen)
    qs, ks, ws = [], [], []
    for _ in range(batch):
        context = _Context(keys, basis.topics.shape[0], structure, gen)
        ks.append(_keys(context, basis, structure, gen))
        q_row, w_row = _queries(context, queries, basis, heads_info, structure, gen)
        qs.append(q_row)
        ws.append(w_row)
    q, k, w = torch.stack(qs), torch.stack(ks), torch.stack(ws)
    planted = ([] if needle is None else
               [_plant_needle(needle, b, q, k, w, basis, heads_info, structure, gen)
                for b in range(batch)])
    return Workload(q=q.to(device, dtype), k=k.to(device, dtype), w=w.to(device, dtype),
                    setting="structured", seed=seed, needles=planted)


# Rotary frequencies of the recency component: one slow pair spanning the context, one fast pair
# over the recency window. Plus one sink direction; the remaining directions hold the topics.
_ROTARY_PAIRS = 2
_MIN_STRUCTURED_DIM = 2 * _ROTARY_PAIRS + 1 + 2


class _Basis:
    """An orthonormal frame split into rotary pairs, the sink direction and topic directions."""

    def __init__(self, dim: int, heads: int, gen: torch.Generator):
        frame, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        frame = frame.T  # rows are orthonormal directions
        self.rotary = frame[:2 * _ROTARY_PAIRS].reshape(_ROTARY_PAIRS, 2, dim)
        self.sink = frame[2 * _ROTARY_PAIRS]
        topic_space = frame[2 * _ROTARY_PAIRS + 1:]
        count = min(heads, topic_space.shape[0])
        if count == heads:
            self.topics = topic_space[:heads]
        else:
            # Fewer free directions than heads: topics become unit mixtures inside that space
            # (they correlate, as heads of a small model do).
            mix = torch.randn(heads, topic_space.shape[0], generator=gen)
            self.topics = torch.nn.functional.normalize(mix, dim=-1) @ topic_space
        self.topic_space = topic_space


class _HeadRoles:
    """Which head is local (recency) or topical, its topic, weight sign and base magnitude."""

    def __init__(self, heads: int, structure: Structure, topics: int, gen: torch.Generator):
        order = torch.randperm(heads, generator=gen)
        important = structure.important_heads or max(1, heads // 8)
        important = min(important, heads)
        local = min(int(round(structure.local_fraction * heads)), heads - important)
        self.important = order[:important].tolist()
        self.local = order[important:important + local].tolist()
        # Important heads stay positive; a fraction of the others get negative weights.
        rest = order[important:]
        negative_count = int(round(structure.negative_fraction * rest.numel()))
        negative = rest[torch.randperm(rest.numel(), generator=gen)[:negative_count]]
        self.topic = torch.randperm(heads, generator=gen) % topics
        self.magnitude = torch.exp(structure.weight_spread * torch.randn(heads, generator=gen))
        self.magnitude[self.important] *= structure.important_weight
        self.sign = torch.ones(heads)
        self.sign[negative] = -1.0
        # Query strength along the head's own direction: heads differ in how sharply they focus.
        self.strength = 0.6 + 0.8 * torch.rand(heads, generator=gen)


class _Context:
    """The topic layout of one sequence: segments with a dominant and a secondary topic."""

    def __init__(self, keys: int, topics: int, structure: Structure, gen: torch.Generator):
        # Zipf-like popularity: a few topics fill most of the context, some are rare.
        popularity = 1.0 / torch.arange(1, topics + 1, dtype=torch.float32)
        popularity = popularity[torch.randperm(topics, generator=gen)]
        self.dominant = torch.empty(keys, dtype=torch.long)
        self.secondary = torch.empty(keys, dtype=torch.long)
        start = 0
        while start < keys:
            length = 1 + int(torch.empty(1).exponential_(1.0 / structure.segment_length,
                                                         generator=gen).item())
            first, second = torch.multinomial(popularity, 2, replacement=False, generator=gen)
            self.dominant[start:start + length] = first
            self.secondary[start:start + length] = second
            start += length
        self.keys = keys


def _rotary(positions: Tensor, keys: int, structure: Structure) -> Tensor:
    """[n, pairs, 2] cos/sin of each rotary pair: the slow pair turns by pi/2 across the
    context (its dot product decreases monotonically with distance), the fast one by pi over the
    recency window."""
    freqs = torch.tensor([math.pi / (2 * max(keys, 1)), math.pi / structure.recency_window])
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _keys(context: _Context, basis: _Basis, structure: Structure, gen: torch.Generator) -> Tensor:
    keys = context.keys
    dim = basis.sink.shape[0]
    amplitude = 1.0 + 0.25 * torch.randn(keys, 1, generator=gen)
    k = amplitude * (basis.topics[context.dominant] + 0.4 * basis.topics[context.secondary])
    k = k + torch.einsum("npc,pcd->nd", _rotary(torch.arange(keys), keys, structure), basis.rotary)
    k = k + structure.key_noise * torch.randn(keys, dim, generator=gen) / math.sqrt(dim)
    sink = min(structure.sink_keys, keys)
    k[:sink] += 3.0 * basis.sink
    return k


def _queries(context: _Context, queries: int, basis: _Basis, roles: _HeadRoles,
             structure: Structure, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    keys = context.keys
    heads, dim = roles.topic.shape[0], basis.sink.shape[0]
    positions = torch.arange(keys - queries, keys)
    # Interest: the topic of the query's own segment, and one topic from earlier in the context.
    own = context.dominant[positions]
    asked = context.dominant[torch.randint(0, keys, (queries,), generator=gen)]
    interested = (roles.topic[None, :] == own[:, None]) | (roles.topic[None, :] == asked[:, None])
    boost = 1.0 + structure.interest_boost * interested.float()              # [S, H]
    strength = roles.strength[None, :] * (1.0 + 0.3 * torch.randn(queries, heads, generator=gen))
    q = (strength * boost)[..., None] * basis.topics[roles.topic][None]       # [S, H, D]
    rot = torch.einsum("npc,pcd->nd", _rotary(positions, keys, structure), basis.rotary)
    local = torch.zeros(heads, dtype=torch.bool)
    local[roles.local] = True
    # Local heads look at recent keys: their query is mostly the rotary component, with a weak
    # topical part.
    q[:, local] = 0.3 * q[:, local] + 1.5 * rot[:, None, :]
    q = q + 0.5 * (strength * boost)[..., None] * basis.sink                  # attention sink
    q = q + structure.query_noise * torch.randn(queries, heads, dim, generator=gen) / math.sqrt(dim)
    jitter = 1.0 + 0.3 * torch.randn(queries, heads, generator=gen)
    w = roles.sign * roles.magnitude * boost * jitter
    return q, w


def _plant_needle(spec: NeedleSpec, batch: int, q: Tensor, k: Tensor, w: Tensor, basis: _Basis,
                  roles: _HeadRoles, structure: Structure, gen: torch.Generator) -> PlantedNeedle:
    queries, heads = q.shape[1], q.shape[2]
    keys = k.shape[1]
    if not 0.0 <= spec.depth <= 1.0:
        raise ValueError(f"NeedleSpec.depth={spec.depth}: must be in [0, 1]")
    if not 1 <= spec.queries <= queries:
        raise ValueError(f"NeedleSpec.queries={spec.queries}: must be in [1, S] = [1, {queries}]")
    head = roles.important[0] if spec.head is None else spec.head
    if not 0 <= head < heads:
        raise ValueError(f"NeedleSpec.head={head}: must be in [0, H) = [0, {heads})")
    # Depth 1 is the last key the first searching query sees (end-aligned causal visibility).
    rows = tuple(range(queries - spec.queries, queries))
    last_visible = keys - queries + rows[0]
    position = int(round(spec.depth * last_visible))
    rows_t = list(rows)
    # The searching queries are interested in the needle the way a query is interested in a topic
    # (same boost of query strength and weight), with a positive weight.
    boost = 1.0 + structure.interest_boost
    w[batch, rows_t, head] = roles.magnitude[head] * boost
    query_size = roles.strength[head] * boost
    direction = _needle_direction(head, query_size, q[batch, rows_t], w[batch, rows_t], basis,
                                  roles, gen)
    q[batch, rows_t, head] = query_size * direction
    rotary = torch.einsum("pc,pcd->d", _rotary(torch.tensor([position]), keys, structure)[0],
                          basis.rotary)
    others = _best_other_scores(q[batch, rows_t], k[batch], w[batch, rows_t], rows, queries,
                                position)
    strength = 1.0
    for _ in range(40):
        k[batch, position] = strength * direction + rotary
        needle = _scores_at(q[batch, rows_t], k[batch, position], w[batch, rows_t])
        margin = float((needle / others).min()) if bool((others > 0).all()) else float("inf")
        if bool((needle > 0).all()) and margin >= structure.needle_margin:
            return PlantedNeedle(position=position, head=head, query_rows=rows, batch=batch,
                                 margin=margin)
        strength *= 1.5
    raise RuntimeError(f"could not plant a needle at depth {spec.depth} (head {head}) that "
                       f"out-scores every other key by {structure.needle_margin}x")


def _needle_direction(head: int, query_size: float, q_rows: Tensor, w_rows: Tensor,
                      basis: _Basis, roles: _HeadRoles, gen: torch.Generator) -> Tensor:
    """A unit direction half along the head's topic (the needle is about something the context
    talks about) and half its own, a random direction of the topic space like any key's content.
    Directions that the other heads of the searching queries answer with more than half the
    needle head's term (negative heads could cancel it) are redrawn: the needle head must
    dominate its score."""
    topic = basis.topics[roles.topic[head]]
    others = torch.ones(q_rows.shape[1], dtype=torch.bool)
    others[head] = False
    for _ in range(64):
        own = torch.randn(basis.topic_space.shape[0], generator=gen) @ basis.topic_space
        own = torch.nn.functional.normalize(own - (own @ topic) * topic, dim=0)
        direction = 0.5 * topic + math.sqrt(0.75) * own
        # Per unit of needle size; the needle head's query will be query_size * direction.
        head_term = w_rows[:, head] * query_size
        rest = (w_rows[:, others] * (q_rows[:, others] @ direction).relu()).abs().sum(-1)
        if bool((rest < 0.5 * head_term).all()):
            return direction
    raise RuntimeError(f"no needle direction that head {head} dominates: the other heads' "
                       "queries answer every direction tried")


def _scores_at(q_rows: Tensor, key: Tensor, w_rows: Tensor) -> Tensor:
    return (w_rows * (q_rows @ key).relu()).sum(-1)


def _best_other_scores(q_rows: Tensor, k: Tensor, w_rows: Tensor, rows: tuple, queries: int,
                       position: int) -> Tensor:
    """Best dense score of any other key each searching query sees (end-aligned causal)."""
    keys = k.shape[0]
    scores = torch.einsum("nhd,td->nht", q_rows, k).relu()
    scores = torch.einsum("nht,nh->nt", scores, w_rows)
    last = torch.tensor([keys - queries + r for r in rows])
    hidden = torch.arange(keys)[None, :] > last[:, None]
    hidden[:, position] = True
    return scores.masked_fill(hidden, float("-inf")).max(-1).values.clamp_min(1e-6)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype}: allowed {', '.join(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _check_sizes(batch: int, queries: int, keys: int, heads: int, dim: int,
                 minimum_dim: int) -> None:
    for name, value, low in (("batch", batch, 1), ("queries", queries, 1), ("keys", keys, 1),
                             ("heads", heads, 1), ("dim", dim, minimum_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: must be an int >= {low}")
    if queries > keys:
        raise ValueError(f"queries={queries}: must be <= keys={keys} (the queries are the last S "
                         "positions of the context)")
