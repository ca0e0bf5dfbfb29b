"""The special tokens and sampling settings of each OneGen task (values of the reference workflows).

A `Task` names its tokens by string; ids come from the tokenizer by name (never by list position).
`descriptions` holds the text whose mean token embedding initialises each new token's embedding
and LM-head rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Task:
  """Tokens and sampling of one task.

  query_token: the RET token of examples (query side); doc_token: the RET token of documents.
  ctx_spans: (open, close) tags; assistant text from open to close inclusive is CTX (no loss).
  force_after: RET token -> the token inference forces right after it (the reference never trains
    the token after a RET token, so the model cannot learn it).
  gen_tokens: further special tokens the model generates (trained as ordinary GEN tokens).
  descriptions: token -> description string for initialising its embedding.
  mention_tags: (open, close) around a mention in an EL answer.
  n_pos_per_sent: RET anchors sampled per example; n_neg_per_pos: negatives per anchor.
  query_template, doc_instruction: the reference prompts ({input}: the question or text;
    {title}: the entity); the instruction holds one literal RET token, in the user segment.
  """

  name: str
  query_token: str
  doc_token: str
  ctx_spans: tuple[tuple[str, str], ...] = ()
  force_after: tuple[tuple[str, str], ...] = ()
  gen_tokens: tuple[str, ...] = ()
  descriptions: tuple[tuple[str, str], ...] = ()
  n_pos_per_sent: int = 1
  n_neg_per_pos: int = 1
  query_template: str = "{input}"
  doc_instruction: str = ""
  mention_tags: tuple[str, str] | None = None

  @property
  def mode(self) -> str:
    """What a retrieval does at inference: "el" links an entity (the forced token follows the
    query), "rag" inserts the retrieved document."""
    return "el" if self.force_after else "rag"

  @property
  def special_tokens(self) -> tuple[str, ...]:
    """Every token the tokenizer must hold as one unsplittable token."""
    tokens = [self.query_token, self.doc_token, *self.gen_tokens]
    tokens += [t for span in self.ctx_spans for t in span]
    return tuple(dict.fromkeys(tokens))

  def description(self, token: str) -> str:
    return dict(self.descriptions)[token]

  def document_text(self, contents: Sequence[str]) -> str:
    """The text of a document (its assistant contents) as a retrieval puts it into a context:
    joined, without the document RET tokens, every other character kept."""
    return "".join(contents).replace(self.doc_token, "")

  def mention_markup(self, surface: str) -> str:
    """An EL answer's rewrite of a mention: `<MENTION>m</MENTION>[LK][_CONTINUE_]`."""
    open_tag, close_tag = self.mention_tags
    return f"{open_tag}{surface}{close_tag}{self.query_token}{dict(self.force_after)[self.query_token]}"

  def linked_mentions(self, text: str, entities: Sequence[str | None]) -> tuple[str, list[dict]]:
    """An EL answer (mention_markup around each mention) -> (plain text, mentions in order with
    character offsets into the plain text, the i-th taking entities[i] (None past the end))."""
    open_tag, close_tag = self.mention_tags
    for token in (self.query_token, *dict(self.force_after).values()):
      text = text.replace(token, "")
    plain, mentions, cursor, length = [], [], 0, 0
    pattern = re.compile(re.escape(open_tag) + "(.*?)" + re.escape(close_tag), re.DOTALL)
    for i, match in enumerate(pattern.finditer(text)):
      before, surface = text[cursor:match.start()], match[1]
      length += len(before)
      mentions.append({"start": length, "end": length + len(surface), "surface": surface,
                       "entity": entities[i] if i < len(entities) else None})
      plain += [before, surface]
      length += len(surface)
      cursor = match.end()
    plain.append(text[cursor:])
    return "".join(plain), mentions

  def insertion(self, text: str) -> str:
    """What follows a query RET token when a document of this text is retrieved (RAG): the text
    inside the task's CTX span tags. Training data and inference both build it here."""
    if not self.ctx_spans:
      raise ValueError(f"task {self.name!r} inserts no documents (it has no CTX span tags)")
    open_tag, close_tag = self.ctx_spans[0]
    return f"{open_tag}{text}{close_tag}"

  def insertion_pattern(self) -> re.Pattern:
    """`insertion` as a pattern (non-greedy, across lines): group 1 is the inserted text."""
    open_tag, close_tag = self.ctx_spans[0]
    return re.compile(re.escape(open_tag) + "(.*?)" + re.escape(close_tag), re.S)


_RAG_RET = (("[Question Representation]", "infomation of question"),
            ("[Document Fragment Representation]", "information of document fragment"))
_PARAGRAPH = (("<paragraph>", "a tag to indicate the start of the retrieved document begins here"),
              ("</paragraph>", "a tag to indicate the end of the retrieved document starts here"))
_SELF_RAG_GEN = (
    ("[No Retrieval]", "a tag indicating no need for retrieval"),
    ("[Retrieval]", "a tag indicating need for retrieval"),
    ("[Continue to Use Evidence]", "a tag indicating continue to use evidence"),
    ("[Irrelevant]", "a tag to denote content irrelevant to the query"),
    ("[Relevant]", "a tag to denote content relevant to the query"),
    ("[Utility:1]", "a tag to denote the current generated result is poor"),
    ("[Utility:2]", "a tag to denote the current generated result is fair"),
    ("[Utility:3]", "a tag to denote the current generated result is good"),
    ("[Utility:4]", "a tag to denote the current generated result is great"),
    ("[Utility:5]", "a tag to denote the current generated result is excellent"),
    ("[Fully supported]", "a tag to indicate that the current generated results are all "
                          "supported by the retrieved documents"),
    ("[Partially supported]", "a tag to indicate that the current generated result has received "
                              "partial support from the retrieved documents"),
    ("[No support / Contradictory]", "a tag to indicate that the current generated result has not "
                                     "received support from the retrieved documents"),
)
_RAG_QUERY_TEMPLATE = (
    "You are good at multi-step reasoning in QA. For complex questions, break down the process. "
    "Generate and answer sub-questions step-by-step, using retrieved documents at each stage. "
    "Output the final answer wrapped by <FINAL-ANSWER></FINAL-ANSWER>. Here is a question: {input}")
_RAG_DOC_INSTRUCTION = ("Represent the following document fragment and output it after the "
                        "'[Document Fragment Representation]' token. \nHere are document fragment:\n")

EL = Task(
    name="el", query_token="[LK]", doc_token="[SE]",
    force_after=(("[LK]", "[_CONTINUE_]"),), gen_tokens=("[_CONTINUE_]",),
    descriptions=(("[_CONTINUE_]", "continue to output"), ("[SE]", "description of entity"),
                  ("[LK]", "information of subject or object")),
    n_pos_per_sent=1, n_neg_per_pos=4, mention_tags=("<MENTION>", "</MENTION>"),
    query_template=(
        "[INST] You are good at mention detection. Identify and extract mentions of entities from "
        "the text. Please output the original text with annotations. Here, the annotation for each "
        "mention should be formatted as `<MENTION>{{mention in text}}</MENTION>` when displayed. "
        "\n\nTEST TEXT:\n{input} [/INST]"),
    doc_instruction=("Represent the entity based on its description and output it after the "
                     "'[SE]' token.\nThe description of {title} is as follows:\n"))

MULTIHOP = Task(
    name="multihop", query_token="[Question Representation]",
    doc_token="[Document Fragment Representation]", ctx_spans=(("<paragraph>", "</paragraph>"),),
    descriptions=_RAG_RET + _PARAGRAPH, n_pos_per_sent=2, n_neg_per_pos=6,
    query_template=_RAG_QUERY_TEMPLATE, doc_instruction=_RAG_DOC_INSTRUCTION)

SELFRAG = dataclasses.replace(
    MULTIHOP, name="selfrag", gen_tokens=tuple(t for t, _ in _SELF_RAG_GEN),
    descriptions=_SELF_RAG_GEN + _RAG_RET + _PARAGRAPH, n_pos_per_sent=1, n_neg_per_pos=2,
    query_template="### Instruction:\n{input}\n\n### Response:\n")  # Self-RAG's prompt_no_input

TASKS = {task.name: task for task in (EL, MULTIHOP, SELFRAG)}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]
