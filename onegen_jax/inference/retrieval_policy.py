"""What happens after a retrieval: one owner per task.

A query RET token the model writes is searched (its hidden state is the query vector), and then
the task decides what the request's cache gets next:
  - EL (`LinkEntity`): the entity keys are searched (a request's candidates restrict the search)
    and the task's forced token ([_CONTINUE_]) follows the RET token (the reference never trains
    the token after a RET token, so the model cannot write it);
  - RAG (`InsertDocument`): documents are searched (a paragraph's sentence keys map to it) and the
    best document's insertion follows, `TaskTokenizer.insertion_tokens` of its text
    (`<paragraph>{text}</paragraph>` tokenised as training tokenised it);
  - Self-RAG runs on an `InsertDocument` engine: its procedure (selfrag.py) searches the model's
    own query through the policy and branches one row per document with the policy's insertion.
`make_policy` is the one constructor (the Engine calls it with its arguments); `task_retrieval`
is the one place a run's task, index and documents become those arguments (make_engine), and
`choose_retrieval` the search launch.infer and launch.serve run: the host's index, or the KB
the device loop searches (the Engine's `device`) once its bytes per device (`task_footprint` of
`task_table`) fit the budget (`device_kb_budget`); launch.build_index prints that footprint.
Each policy acts on the host (`search`, `search_among`, `follow`: the Engine) and on the devices
(`device_search`, `device_follow` over a retrieval/device_kb.DeviceKB: pure, jit-able, for the
compiled decode loop), the two giving the same ids and tokens (tests/test_device_kb.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from onegen_jax.inference.device_loop import DeviceRetrieval
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.candidates import CandidateScorer, RankPrior

if TYPE_CHECKING:  # the engine imports this module without an index (run_dir imports it too)
  from onegen_jax.inference.run_dir import LoadedRun
  from onegen_jax.retrieval.index import Index

# (query vectors float32 [n, D], k) -> (ids [n][k], scores float32 [n, k])
SearchFn = Callable[[np.ndarray, int], tuple[list[list[str]], np.ndarray]]
# (query vector float32 [D], candidate uids, k) -> (ids [<= k], scores [<= k]), best first
CandidateSearchFn = Callable[[np.ndarray, Sequence[str], int], tuple[list[str], np.ndarray]]
MODES = ("rag", "el")
# Of device memory (train/remat_auto.device_budget's) a device KB may take by default: the rest
# holds the parameters, the KV cache and the loop's transients.
DEVICE_KB_FRACTION = 0.25
BUDGET_HELP = ("MiB per device the device KB (--steps_per_dispatch > 1: the index's keys and "
               f"RAG's token table on the mesh) may take; 0: {DEVICE_KB_FRACTION:.0%} of a "
               "device's memory (CPU: of the host RAM per local device).")


def first_k(ids: Sequence[str], scores: Sequence[float], k: int,
            inserted: Collection[str] = ()) -> tuple[list[str], list[float]]:
  """The first k of a search's ids and scores (best first), every uid in `inserted` (documents
  the request inserted already: GenerationConfig.novel_documents) moved after the others."""
  order = sorted(range(len(ids)), key=lambda i: ids[i] in inserted)  # stable: rank kept
  return [ids[i] for i in order[:k]], [float(scores[i]) for i in order[:k]]


class RetrievalPolicy(abc.ABC):
  """The search a query runs and the tokens fed after its RET token.

  search: the whole index's top k; search_candidates: exact search among given uids
  (Request.candidates; None: a request with candidates fails)."""

  mode: str  # one of MODES

  def __init__(self, search: SearchFn, search_candidates: CandidateSearchFn | None = None):
    self.search, self.search_candidates = search, search_candidates

  def search_among(self, query: np.ndarray, candidates: Sequence[str],
                   k: int) -> tuple[list[str], np.ndarray]:
    """query float32 [D] searched among `candidates` -> (ids [<= k], scores [<= k])."""
    if self.search_candidates is None:
      raise ValueError("a request has candidates but the engine has no search_candidates")
    return self.search_candidates(query, candidates, k)

  @abc.abstractmethod
  def follow(self, ids: Sequence[str]) -> list[int]:
    """The tokens fed right after the RET token whose search found `ids` (best first)."""

  @abc.abstractmethod
  def device_search(self, kb: device_kb.DeviceKB, queries: jax.Array, k: int,
                    candidates: device_kb.CandidateRows | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """`search` (and, for the queries `candidates` restricts, `search_among`) on the devices:
    queries float32 [B, D] -> (rows int32 [B, k] of what `follow` reads, -1: no hit; scores
    float32 [B, k])."""

  @abc.abstractmethod
  def device_follow(self, kb: device_kb.DeviceKB,
                    best: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`follow` on the devices: each query's best row int32 [B] of device_search ->
    (tokens int32 [B, L], lengths int32 [B]), 0-padded."""

  @abc.abstractmethod
  def follow_width(self, kb: device_kb.DeviceKB) -> int:
    """L: the width of device_follow's tokens (static)."""


class LinkEntity(RetrievalPolicy):
  """EL: the forced token follows every query; the found entity is the link."""

  mode = "el"

  def __init__(self, force: int, search: SearchFn,
               search_candidates: CandidateSearchFn | None = None):
    super().__init__(search, search_candidates)
    self.force = force

  def follow(self, ids: Sequence[str]) -> list[int]:
    return [self.force]

  def device_search(self, kb, queries, k, candidates=None):
    return device_kb.search(kb, queries, k, candidates)

  def device_follow(self, kb, best):
    """The forced token, found or not (a query without a hit links to nothing, as on the host)."""
    return jnp.full((len(best), 1), self.force, jnp.int32), jnp.ones(len(best), jnp.int32)

  def follow_width(self, kb):
    return 1


class InsertDocument(RetrievalPolicy):
  """RAG: the best document's insertion follows the query. documents: document uid -> the token
  ids of its insertion (None: an engine that never inserts; a retrieval then fails its request)."""

  mode = "rag"

  def __init__(self, documents: Callable[[str], Sequence[int]] | None, search: SearchFn,
               search_candidates: CandidateSearchFn | None = None):
    super().__init__(search, search_candidates)
    self.documents = documents

  def insertion(self, uid: str) -> list[int]:
    """The token ids inserted for document `uid`."""
    return list(self.documents(uid))

  def follow(self, ids: Sequence[str]) -> list[int]:
    return self.insertion(ids[0])

  def device_search(self, kb, queries, k, candidates=None):
    """Document rows (device_kb.search_documents); candidates restrict EL's entity search."""
    if candidates is not None:
      raise ValueError("RAG searches documents: candidates restrict entity linking's search")
    return device_kb.search_documents(kb, queries, k)

  def device_follow(self, kb, best):
    """The document's insertion from the KB's token table; length 0 for -1 (no document: the
    host engine fails such a request)."""
    return device_kb.insertion(kb, best)

  def follow_width(self, kb):
    return kb.tokens.shape[1]


def make_policy(mode: str, search: SearchFn, documents: Callable[[str], Sequence[int]] | None,
                force: int | None, search_candidates: CandidateSearchFn | None = None,
                novel: bool = False) -> RetrievalPolicy:
  """The policy of `mode` ("rag" or "el"); force: EL's token after the query token."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected 'rag' or 'el'")
  if mode == "el":
    if novel:
      raise ValueError("novel_documents is RAG's: entity linking may link an entity again")
    if force is None:
      raise ValueError("entity linking needs the token forced after the query token")
    return LinkEntity(force, search, search_candidates)
  return InsertDocument(documents, search, search_candidates)


def device_kb_budget(mesh: Mesh, mib: int = 0) -> int:
  """Bytes per device of `mesh` a device KB may take: `mib` MiB, or with 0 DEVICE_KB_FRACTION of
  a device's memory (remat_auto.device_budget: an accelerator's bytes_limit, on CPU the host RAM
  over its local devices)."""
  from onegen_jax.train.remat_auto import device_budget  # noqa: PLC0415  (imports the train step)
  return mib * device_kb.MIB if mib else device_budget(list(mesh.devices.flat), DEVICE_KB_FRACTION)


def task_documents(run: LoadedRun, texts: dict[str, str]) -> Callable[[str], list[int]]:
  """A document uid -> what follows the query token that retrieved it,
  `insertion_tokens(texts[uid])`: the host engine's `documents` and the device KB's table
  alike (texts: build_index's documents.json)."""
  return lambda uid: run.tokenizer.insertion_tokens(texts[uid])


def task_table(run: LoadedRun, key_uids: Sequence[str],
               texts: dict[str, str]) -> device_kb.InsertionTable | None:
  """RAG's insertion table of the keys `key_uids` (task_documents, built once, on the host);
  None for EL."""
  return (device_kb.insertion_table(key_uids, task_documents(run, texts))
          if run.task.mode == "rag" else None)


def task_footprint(run: LoadedRun, num_keys: int, dim: int,
                   table: device_kb.InsertionTable | None,
                   dtype=np.float32) -> device_kb.Footprint:
  """The bytes per device a device KB of `num_keys` keys [dim] in `dtype` and `table` (task_table)
  would hold on the run's mesh, from the sizes alone (nothing is placed)."""
  num_docs, width = (0, 0) if table is None else table.tokens.shape
  return device_kb.footprint(num_keys, dim, dtype, run.mesh.devices.size, num_docs, width)


def choose_retrieval(run: LoadedRun, index: Index, texts: dict[str, str], vectors: np.ndarray,
                     prior: RankPrior | None, steps_per_dispatch: int,
                     budget: int) -> tuple[str, DeviceRetrieval | None]:
  """Where launch.infer's and launch.serve's search runs, and the line they print saying why.

  steps_per_dispatch 1: the host's `index` (the KB is not tokenised or sized; build_index
  printed its size), device None. Above 1: the device loop's KB, placed on the run's mesh when
  its Footprint fits `budget` bytes per device (device_kb_budget), as task_retrieval searches on
  the host: vectors [keys, D] in the index's key order (rows sharded over all the mesh's axes),
  RAG's token table of `insertion_tokens(texts[uid])`, EL's candidates ranked with `prior`.
  ValueError naming both sizes when it does not fit; KeyError when texts lacks a document."""
  host = type(index).__name__
  if steps_per_dispatch <= 1:
    return f"retrieval: on the host, {host} (--steps_per_dispatch=1)", None
  table = task_table(run, index.ids, texts)
  footprint = task_footprint(run, len(index.ids), vectors.shape[1], table)
  if not footprint.fits(budget):
    raise ValueError(
        f"--steps_per_dispatch={steps_per_dispatch} puts the index on the devices, but its KB "
        f"takes {footprint.total / device_kb.MIB:.1f} MiB per device, over the budget of "
        f"{budget / device_kb.MIB:.1f} MiB per device (--device_kb_budget_mib): raise the budget "
        f"or run --steps_per_dispatch=1 (the host's {host})")
  line = (f"retrieval: on the devices, in the decode loop (--steps_per_dispatch="
          f"{steps_per_dispatch}); {footprint.summary(budget)}")
  return line, DeviceRetrieval.place(vectors, index.ids, run.mesh, table, prior)


def task_retrieval(run: LoadedRun, index: Index, texts: dict[str, str],
                   vectors: np.ndarray | None = None, prior: RankPrior | None = None) -> dict:
  """The Engine's retrieval arguments (mode, search, documents, search_candidates) for a run's
  task: RAG searches documents (`Index.search_documents`) and inserts
  `insertion_tokens(texts[uid])`; EL searches entity keys. vectors [keys, D] in the index's key
  order (build_index's vectors.npy) enable requests with candidates, ranked by cosine alone or,
  with `prior`, combined with the candidates' order."""
  rag = run.task.mode == "rag"
  return dict(mode=run.task.mode, search=index.search_documents if rag else index.search,
              documents=task_documents(run, texts),
              search_candidates=(None if vectors is None
                                 else CandidateScorer(vectors, index.ids, prior).search))
