"""Small datasets the project makes itself, in the reference format, plus a tokenizer trained on them.

Entity linking: a knowledge base of invented entities whose names are shared by two or three
entities of different types and places, so linking a mention needs its context. An example asks
to annotate a text; the answer rewrites each mention as `<MENTION>m</MENTION>[LK][_CONTINUE_]`
(positive: the entity, negatives: its namesakes and entities of the same type). A few mentions
name no entity of the KB (positive null).

Multi-hop RAG: invented people, companies and cities; each has a paragraph of two sentences, each
sentence ending with a document RET token (keys "doc" and "doc-1"). A question needs one or two
hops; the answer asks a sub-question, emits [Question Representation], reads the retrieved
`<paragraph>...</paragraph>` and continues (positive: the sentence holding the fact, negatives:
the same sentence of similar documents).

Self-RAG: the same invented world. A question about a person's birthplace or a company's founder
can be answered only from the corpus: the answer retrieves (`[Retrieval][Question
Representation]`), reads the entity's paragraph and critiques it (`[Relevant]{answer}[Fully
supported][Utility:5]`) and also trains on a distractor paragraph (another entity of the same
kind: `[Irrelevant]{the distractor's value}[No support /
Contradictory][Utility:2]`, no retrieval target). A question asking to repeat a word needs no
retrieval (`[No Retrieval]{word}[Utility:5]`). Dev questions ask about a fifth of the entities
that training never asks about (their answers are only in the corpus, not in the weights). Dev
lines carry "answers" and "needs_retrieval" (the generator's rule), so a trained model's
decisions and answers can be checked.

Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onegen_jax.data.dataset_dir import EOS, write_dataset
from onegen_jax.data.records import conversation, db_entry
from onegen_jax.data.tasks import EL, MULTIHOP, SELFRAG

_SYLLABLES = ("ka", "lo", "mi", "ren", "dor", "sa", "vel", "tin", "bra", "mor", "quen", "zar",
              "li", "tho", "ne", "gal", "ur", "fen", "is", "pa", "ost", "cre", "wyn", "ad")


def _words(rng: np.random.Generator, n: int, syllables: int) -> list[str]:
  """n distinct capitalised pseudo-words."""
  out: dict[str, None] = {}
  while len(out) < n:
    out["".join(rng.choice(_SYLLABLES, syllables)).capitalize()] = None
  return list(out)


_TYPES = (("river", "flows through"), ("painter", "worked in"), ("city", "lies in"),
          ("band", "toured"), ("ship", "sailed to"), ("mountain", "rises above"),
          ("company", "opened an office in"), ("festival", "is held in"))
_TRAITS = ("granite bridges", "bright colours", "old harbour", "loud songs", "long voyages",
           "snowy peaks", "glass towers", "night markets", "quiet lakes", "wooden boats")


def make_el(seed: int = 0, num_names: int = 40, num_train: int = 800,
            num_dev: int = 80) -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) of the entity-linking task."""
  rng = np.random.default_rng([seed, 1])
  firsts, lasts, places = _words(rng, 12, 2), _words(rng, 12, 2), _words(rng, 10, 2)
  names = list(dict.fromkeys(f"{rng.choice(firsts)} {rng.choice(lasts)}" for _ in range(200)))
  names = names[:num_names]
  entities = []  # (uid, name, type index, place)
  for name in names:
    for t in rng.choice(len(_TYPES), rng.integers(2, 4), replace=False):
      entities.append((f"ent{len(entities)}", name, int(t), str(rng.choice(places))))
  db = []
  for uid, name, t, place in entities:
    body = (f"{name} is a {_TYPES[t][0]} in {place}, first recorded in {rng.integers(1700, 2000)}."
            f" It is known for its {rng.choice(_TRAITS)}.{EL.doc_token}")
    db.append(db_entry(EL, uid, name, body))
  unknown = [f"{a} {b}" for a, b in zip(_words(rng, 6, 3), _words(rng, 6, 3))]

  def example(rng):
    texts, annotated, positive, negative = [], [], [], []
    for _ in range(rng.integers(1, 4)):
      uid, name, t, place = entities[rng.integers(len(entities))]
      if rng.random() < 0.05:
        uid, name = None, str(rng.choice(unknown))
      kind, verb = _TYPES[t]
      sentence = (f"The {kind} {{}} {verb} {place}." if rng.random() < 0.5 else
                  f"Near {place}, the {kind} {{}} was seen.")
      texts.append(sentence.format(name))
      annotated.append(sentence.format(EL.mention_markup(name)))
      positive.append(uid)
      if uid is None:
        negative.append([])
      else:
        namesakes = [e[0] for e in entities if e[1] == name and e[0] != uid]
        same_type = [e[0] for e in entities if e[2] == t and e[0] != uid]
        picked = rng.choice(same_type, min(3, len(same_type)), replace=False)
        negative.append(namesakes + [str(u) for u in picked])
    return conversation(EL.query_template.format(input=" ".join(texts)),
                         " ".join(annotated) + f" {EOS}", positive, negative)

  examples = [example(rng) for _ in range(num_train + num_dev)]
  return examples[:num_train], examples[num_train:], db


_INDUSTRIES = ("shipping", "software", "textile", "mining", "brewing", "railway", "publishing")


@dataclasses.dataclass(frozen=True)
class _World:
  """The invented people, companies and cities of the multi-hop task, their relations, and each
  entity's two sentences (uid -> (title, [sentence 0, sentence 1]))."""

  people: list[str]
  companies: list[str]
  country_of: dict[str, str]
  born_in: dict[str, str]
  founder: dict[str, str]
  sentences: dict[str, tuple[str, list[str]]]


def _world(rng: np.random.Generator, num_people: int, num_companies: int, num_cities: int) -> _World:
  cities, countries = _words(rng, num_cities, 2), _words(rng, 6, 2)
  people = [f"{a} {b}" for a, b in zip(_words(rng, num_people, 2), _words(rng, num_people, 2))]
  companies = [f"{w} Works" for w in _words(rng, num_companies, 3)]
  country_of = {c: str(rng.choice(countries)) for c in cities}
  born_in = {p: str(rng.choice(cities)) for p in people}
  founder = {c: str(rng.choice(people)) for c in companies}
  sentences = {}
  for i, c in enumerate(cities):
    sentences[f"city{i}"] = (c, [f"{c} is a city with {rng.integers(2, 90)} bridges.",
                                 f"{c} is located in {country_of[c]}."])
  for i, p in enumerate(people):
    sentences[f"person{i}"] = (p, [f"{p} is a writer of {rng.integers(2, 40)} books.",
                                   f"{p} was born in {born_in[p]}."])
  for i, c in enumerate(companies):
    sentences[f"company{i}"] = (c, [f"{c} is a {rng.choice(_INDUSTRIES)} company.",
                                    f"{c} was founded by {founder[c]}."])
  return _World(people, companies, country_of, born_in, founder, sentences)


def make_multihop(seed: int = 0, num_people: int = 60, num_companies: int = 60,
                  num_cities: int = 20, num_train: int = 800,
                  num_dev: int = 80) -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) of the multi-hop RAG task."""
  rng = np.random.default_rng([seed, 2])
  rd, rq = MULTIHOP.doc_token, MULTIHOP.query_token
  w = _world(rng, num_people, num_companies, num_cities)
  people, companies, sentences = w.people, w.companies, w.sentences
  country_of, born_in, founder = w.country_of, w.born_in, w.founder
  uid_of = {title: uid for uid, (title, _) in sentences.items()}
  db = [db_entry(MULTIHOP, uid, title, f"wiki title: {title}\ncontent: " +
                  " ".join(s + rd for s in sents)) for uid, (title, sents) in sentences.items()]

  def paragraph(title: str) -> str:  # written out as a user's data would be; the loader checks
    # that it is what inference inserts for the document (records.check_insertions)
    return MULTIHOP.insertion(f"wiki title: {title}\ncontent: "
                              f"{' '.join(sentences[uid_of[title]][1])}")

  def negatives(uid: str, rng) -> list[str]:
    kind = uid.rstrip("0123456789")
    others = [u for u in sentences if u.rstrip("0123456789") == kind and u != uid]
    return [f"{u}-1" for u in rng.choice(others, 6, replace=False)]

  def hop(question: str, title: str, fact: str, rng) -> tuple[str, str, list[str]]:
    uid = uid_of[title]
    return f"{question}{rq}{paragraph(title)}{fact} ", f"{uid}-1", negatives(uid, rng)

  def example(rng):
    kind = rng.integers(3)
    if kind == 0:
      c = str(rng.choice(companies))
      p = founder[c]
      question = f"Where was the founder of {c} born?"
      hops = [hop(f"Who founded {c}?", c, f"{c} was founded by {p}.", rng),
              hop(f"Where was {p} born?", p, f"{p} was born in {born_in[p]}.", rng)]
      answer = born_in[p]
    elif kind == 1:
      p = str(rng.choice(people))
      question = f"In which country was {p} born?"
      hops = [hop(f"Where was {p} born?", p, f"{p} was born in {born_in[p]}.", rng),
              hop(f"Where is {born_in[p]}?", born_in[p],
                  f"{born_in[p]} is located in {country_of[born_in[p]]}.", rng)]
      answer = country_of[born_in[p]]
    else:
      c = str(rng.choice(companies))
      question = f"Who founded {c}?"
      hops = [hop(f"Who founded {c}?", c, f"{c} was founded by {founder[c]}.", rng)]
      answer = founder[c]
    reply = "".join(h[0] for h in hops) + f"<FINAL-ANSWER>{answer}</FINAL-ANSWER>{EOS}"
    return conversation(MULTIHOP.query_template.format(input=question), reply,
                         [h[1] for h in hops], [h[2] for h in hops])

  examples = [example(rng) for _ in range(num_train + num_dev)]
  return examples[:num_train], examples[num_train:], db


def make_selfrag(seed: int = 0, num_people: int = 200, num_companies: int = 200,
                 num_cities: int = 20, num_train: int = 800,
                 num_dev: int = 80) -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) of the Self-RAG task (module docstring)."""
  rng = np.random.default_rng([seed, 3])
  rq, rd = SELFRAG.query_token, SELFRAG.doc_token
  w = _world(rng, num_people, num_companies, num_cities)
  words = _words(rng, 80, 3)
  uid_of = {title: uid for uid, (title, _) in w.sentences.items()}
  text_of = {uid: f"{title}\n{' '.join(sents)}" for uid, (title, sents) in w.sentences.items()}
  db = [db_entry(SELFRAG, uid, title, text_of[uid] + rd)
        for uid, (title, _) in w.sentences.items() if not uid.startswith("city")]
  facts = ([(f"Where was {p} born?", p, w.born_in) for p in w.people]
           + [(f"Who founded {c}?", c, w.founder) for c in w.companies])
  order = rng.permutation(len(facts))
  held_out = {int(i) for i in order[:len(facts) // 5]}  # dev asks only these: not memorised

  def retrieval(uid: str, verdict: str) -> str:
    return f"[Retrieval]{rq}{SELFRAG.insertion(text_of[uid])}{verdict}"

  def example(rng, dev: bool) -> list[dict]:
    if rng.random() < 0.3:
      word = str(rng.choice(words))
      line = conversation(SELFRAG.query_template.format(input=f"Repeat the word {word}."),
                          f"[No Retrieval]{word}[Utility:5]{EOS}")
      return [dict(line, answers=[word], needs_retrieval=False) if dev else line]
    pool = sorted(held_out) if dev else [i for i in range(len(facts)) if i not in held_out]
    question, entity, relation = facts[pool[rng.integers(len(pool))]]
    uid = uid_of[entity]
    prompt = SELFRAG.query_template.format(input=question)
    # Distractors and negatives from the training entities only: a held-out entity's paragraph
    # seen only as a distractor would teach "unseen entity -> [Irrelevant]".
    same_kind = [e for i, (_, e, r) in enumerate(facts)
                 if r is relation and e != entity and i not in held_out]
    negatives = [uid_of[e] for e in rng.choice(same_kind, 2, replace=False)]
    gold = conversation(prompt, retrieval(uid, f"[Relevant]{relation[entity]}[Fully supported]"
                                               f"[Utility:5]{EOS}"), [uid], [negatives])
    if dev:
      return [dict(gold, answers=[relation[entity]], needs_retrieval=True)]
    distractor = str(rng.choice(same_kind))
    return [gold, conversation(prompt, retrieval(
        uid_of[distractor], f"[Irrelevant]{relation[distractor]}[No support / Contradictory]"
                            f"[Utility:2]{EOS}"), [None], [[]])]

  train = [line for _ in range(num_train) for line in example(rng, dev=False)][:num_train]
  dev = [example(rng, dev=True)[0] for _ in range(num_dev)]
  return train, dev, db


GENERATORS = {"el": (EL, make_el), "multihop": (MULTIHOP, make_multihop),
              "selfrag": (SELFRAG, make_selfrag)}


def make_dataset(task_name: str, out_dir: str, seed: int = 0, vocab_size: int = 512, **sizes):
  """Generates the named task's dataset into out_dir."""
  task, make = GENERATORS[task_name]
  write_dataset(out_dir, task, *make(seed, **sizes), vocab_size=vocab_size)
