"""Token roles on hand-written examples (docs/ONEGEN.md of the shared docs), RAG and EL."""

import numpy as np
import pytest

from data_util import generated
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import Message
from onegen_jax.data.tasks import EL, MULTIHOP

RQ, RD = MULTIHOP.query_token, MULTIHOP.doc_token


@pytest.fixture(scope="module")
def rag():
  return TaskTokenizer(f"{generated('multihop')}/tokenizer", MULTIHOP)


@pytest.fixture(scope="module")
def el():
  return TaskTokenizer(f"{generated('el')}/tokenizer", EL)


def _expected(tok, conversation):
  """(messages, tokens, is_target, RET positions) from messages written as (role, pieces), each
  piece (text, kind) with kind ctx (no target), gen (targets), ret (the RET token, a target)
  or after (the first token is the one after a RET: not a target; the rest are targets)."""
  messages, tokens, targets, rets = [], [], [], []
  for role, pieces in conversation:
    messages.append(Message(role, "".join(text for text, _ in pieces)))
    for text, kind in pieces:
      ids = tok.hf(text, add_special_tokens=False)["input_ids"]
      if kind == "ret":
        assert len(ids) == 1
        rets.append(len(tokens))
      tokens += ids
      targets += [kind != "ctx"] * len(ids)
      if kind == "after":
        targets[len(tokens) - len(ids)] = False
  return messages, np.array(tokens), np.array(targets), np.array(rets)


def _check(tok, conversation, ret_token):
  messages, tokens, targets, rets = _expected(tok, conversation)
  [enc] = tok.tokenize_with_roles([messages], ret_token, max_len=10_000)
  np.testing.assert_array_equal(enc.tokens, tokens)
  np.testing.assert_array_equal(enc.is_target, targets)
  np.testing.assert_array_equal(enc.rets, rets)
  return enc


def test_rag_multi_ret_with_paragraph_spans(rag):
  conversation = [
      ("user", [("Who founded Ada Works? Answer after [Question Representation] tokens.", "ctx")]),
      ("assistant", [("Who founded Ada Works?", "gen"), (RQ, "ret"), ("<paragraph>", "ctx"),
                     ("wiki title: Ada Works\ncontent: Ada Works was founded by Bo.", "ctx"),
                     ("</paragraph>", "ctx"), ("Bo founded it. Where was Bo born?", "gen"),
                     (RQ, "ret"), ("<paragraph>", "ctx"), ("Bo was born in Lo.", "ctx"),
                     ("</paragraph>", "ctx"), ("<FINAL-ANSWER>Lo</FINAL-ANSWER>", "gen"),
                     ("</s>", "gen")]),
  ]
  enc = _check(rag, conversation, RQ)
  assert len(enc.rets) == 2  # the literal RET token in the user turn is context, not an anchor


def test_rag_token_after_ret_is_not_a_target(rag):
  conversation = [("user", [("Question?", "ctx")]),
                  ("assistant", [("Look it up", "gen"), (RQ, "ret"), ("then answer", "after"),
                                 (RQ, "ret"), ("<paragraph>", "ctx"), ("text", "ctx"),
                                 ("</paragraph>", "ctx"), ("done", "gen")]),
                  ("user", [("And then?", "ctx")]),
                  ("assistant", [("More", "gen"), (RQ, "ret"), ("</s>", "after")])]
  enc = _check(rag, conversation, RQ)
  assert len(enc.rets) == 3


def test_rag_document_keys_skip_the_instruction_token(rag):
  conversation = [("user", [(MULTIHOP.doc_instruction, "ctx")]),
                  ("assistant", [("wiki title: Lo\ncontent: Lo is a city.", "gen"), (RD, "ret"),
                                 ("Lo is in Ka.", "after"), (RD, "ret")])]
  enc = _check(rag, conversation, RD)
  assert rag.hf.decode(enc.tokens[:len(enc.tokens) // 4]).startswith("Represent")
  assert len(enc.rets) == 2 and enc.rets[-1] == len(enc.tokens) - 1


def test_el_mentions_each_get_a_ret_token_and_a_forced_continue(el):
  conversation = [
      ("user", [(EL.query_template.format(input="Ada met Bo in Lo."), "ctx")]),
      ("assistant", [("<MENTION>Ada</MENTION>", "gen"), ("[LK]", "ret"), ("[_CONTINUE_]", "after"),
                     (" met <MENTION>Bo</MENTION>", "gen"), ("[LK]", "ret"),
                     ("[_CONTINUE_]", "after"), (" in <MENTION>Lo</MENTION>", "gen"),
                     ("[LK]", "ret"), ("[_CONTINUE_]", "after"), (". </s>", "gen")])]
  enc = _check(el, conversation, "[LK]")
  assert list(enc.tokens[enc.rets + 1]) == [el.ids["[_CONTINUE_]"]] * 3


def test_el_entity_document_has_one_key_token_at_its_end(el):
  conversation = [("user", [(EL.doc_instruction.format(title="Ada"), "ctx")]),
                  ("assistant", [("Ada is a river in Lo.", "gen"), ("[SE]", "ret")])]
  enc = _check(el, conversation, "[SE]")
  assert len(enc.rets) == 1  # the '[SE]' in the instruction is not a key


def test_truncation_keeps_anchor_positions_consistent(el):
  conversation = [("user", [("Text.", "ctx")]),
                  ("assistant", [("<MENTION>Ada</MENTION>", "gen"), ("[LK]", "ret"),
                                 ("[_CONTINUE_]", "after"), (" and <MENTION>Bo</MENTION>", "gen"),
                                 ("[LK]", "ret"), ("[_CONTINUE_]", "after")])]
  messages, tokens, targets, rets = _expected(el, conversation)
  [enc] = el.tokenize_with_roles([messages], "[LK]", max_len=int(rets[1]))  # cuts the second [LK]
  assert enc.cut == len(tokens) - rets[1]
  np.testing.assert_array_equal(enc.tokens, tokens[:rets[1]])
  np.testing.assert_array_equal(enc.is_target, targets[:rets[1]])
  assert list(enc.rets) == [rets[0]]


def test_special_tokens_are_added_by_name(el):
  assert set(el.ids) == {"[LK]", "[SE]", "[_CONTINUE_]"}
  for token, token_id in el.ids.items():
    assert el.hf.convert_ids_to_tokens(token_id) == token
  descriptions = el.description_ids()
  assert el.hf.decode(descriptions[el.ids["[SE]"]]) == "description of entity"
