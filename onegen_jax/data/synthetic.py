"""A synthetic OneGen entity-linking task generated in code: no files, no tokenizer.

A toy knowledge base of entities, each named by two tokens (first, last) drawn from small pools,
so many entities share a name token with others (hard negatives). An entity's document is
`[DOC] first last attr1..attrA [SE]`. An example is a user sentence containing a mention
(`... first last ...`) and an assistant turn that rewrites it as
`... <M> first last </M> [LK] [_CONTINUE_] ... [EOS]`: the model must learn to emit [LK] after a
mention (GEN) and to make the hidden state at [LK] retrieve the entity's [SE] key (RET).
Token roles follow docs/ONEGEN.md: user tokens are CTX, assistant tokens GEN, except
[_CONTINUE_], the token right after the RET token.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onegen_jax.data.packing import Corpus, Key, Query, Segment

PAD, EOS, RET_QUERY, RET_DOC, CONTINUE, MENTION_OPEN, MENTION_CLOSE, DOC_PROMPT = range(8)
FIRST_WORD = 16


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """Entities (name token pairs and attribute tokens), their corpus and the linking examples."""

  vocab_size: int
  names: np.ndarray  # int32 [E, 2]
  corpus: Corpus
  train: list[Segment]
  heldout: list[Segment]


def _entity_uid(e: int) -> str:
  return f"entity{e}"


def _document(name: np.ndarray, attributes: np.ndarray, uid: str) -> Segment:
  tokens = np.concatenate([[DOC_PROMPT], name, attributes, [RET_DOC]]).astype(np.int32)
  is_target = np.ones(len(tokens), bool)
  is_target[0] = False  # the prompt token is the (CTX) user turn
  return Segment(tokens, is_target, keys=(Key(len(tokens) - 1, uid),))


def _example(rng: np.random.Generator, names: np.ndarray, mentioned: list[int],
             filler: np.ndarray, hard_negatives: list[list[int]], num_negatives: int) -> Segment:
  """User: words with the mentions; assistant: the same words with the mentions linked."""
  user, assistant, assistant_target = [], [], []
  queries_at = []
  for e in mentioned:
    words = list(rng.choice(filler, size=rng.integers(1, 4)))
    user += words + list(names[e])
    assistant += words + [MENTION_OPEN, *names[e], MENTION_CLOSE, RET_QUERY, CONTINUE]
    assistant_target += [True] * (len(words) + 5) + [False]  # [_CONTINUE_] is not a target
    queries_at.append(len(assistant) - 2)
  tail = list(rng.choice(filler, size=rng.integers(1, 3)))
  user += tail
  assistant += tail + [EOS]
  assistant_target += [True] * (len(tail) + 1)
  queries = []
  for e, pos in zip(mentioned, queries_at):
    pool = [n for n in hard_negatives[e] if n not in mentioned]
    negatives = list(rng.choice(pool, size=min(num_negatives, len(pool)), replace=False))
    queries.append(Query(len(user) + pos, _entity_uid(e), tuple(_entity_uid(n) for n in negatives)))
  tokens = np.asarray(user + assistant, np.int32)
  is_target = np.asarray([False] * len(user) + assistant_target, bool)
  return Segment(tokens, is_target, queries=tuple(queries))


def make_task(seed: int = 0, num_entities: int = 96, name_pool: int = 16, num_attributes: int = 4,
              attribute_pool: int = 96, filler_pool: int = 64, num_train: int = 4000,
              num_heldout: int = 256, max_mentions: int = 2, num_negatives: int = 3) -> SyntheticTask:
  """Builds the toy KB and `num_train` + `num_heldout` examples, deterministically from `seed`.

  Held-out examples mention the same entities in new random contexts.
  """
  rng = np.random.default_rng(seed)
  first_pool = np.arange(FIRST_WORD, FIRST_WORD + name_pool)
  last_pool = first_pool + name_pool
  attribute_start = FIRST_WORD + 2 * name_pool
  filler = np.arange(attribute_start + attribute_pool, attribute_start + attribute_pool + filler_pool)
  vocab_size = int(filler[-1]) + 1
  pairs = rng.choice(name_pool * name_pool, size=num_entities, replace=False)
  names = np.stack([first_pool[pairs // name_pool], last_pool[pairs % name_pool]], axis=1).astype(np.int32)
  attributes = rng.integers(attribute_start, attribute_start + attribute_pool,
                            size=(num_entities, num_attributes))
  corpus = Corpus({_entity_uid(e): _document(names[e], attributes[e], _entity_uid(e))
                   for e in range(num_entities)})
  hard_negatives = [[n for n in range(num_entities) if n != e and
                     (names[n, 0] == names[e, 0] or names[n, 1] == names[e, 1])] or
                    [n for n in range(num_entities) if n != e] for e in range(num_entities)]
  examples = []
  for _ in range(num_train + num_heldout):
    mentioned = list(rng.choice(num_entities, size=rng.integers(1, max_mentions + 1), replace=False))
    examples.append(_example(rng, names, mentioned, filler, hard_negatives, num_negatives))
  return SyntheticTask(vocab_size, names, corpus, examples[:num_train], examples[num_train:])
