"""The quality study's pure parts (benchmarks/quality): lever flags and fingerprints, the RAG dev
split and pool, per-set figures. No model, no data files: each test builds its few lines."""

import numpy as np
import pytest

from benchmarks.quality import cli, data, ranking, report
from benchmarks.quality.arms import BY_NAME, label
from benchmarks.quality.model import train_config
from benchmarks.quality.results import ArmResult, Generation, GoldRecall


def _args(*flags):
  return cli.parse_args(["--out", "/tmp/unused", "--tasks=", "--sizes=cpu", *flags])


def _arm(args, name):
  return {arm.name: arm for arm in cli.study_arms(args)}[name]


def _train_configs(args, mode, dtype="float32"):
  """{arm name: its training config} of the args' arms on `mode`'s (empty) data."""
  task = data.TaskData(cli.TaskSettings.from_args(args, mode), "train.jsonl", "dev.jsonl",
                       "db.jsonl", "pool.jsonl", "", [], {})
  return {arm.name: train_config(args, task, "/tmp/run", arm, dtype)
          for arm in cli.study_arms(args)}


def _line(*hops):
  """A RAG line with one query per hop: (positive, negatives)."""
  return {"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a", "positive": [p for p, _ in hops],
                        "negative": [n for _, n in hops]}]}


def test_lever_flags_reach_only_the_arms_that_train_with_them():
  """--lambda_ret changes the joint arms (key, loss, fingerprint), not the generation-only or
  retrieval-only ones; --temperature changes the InfoNCE arms only."""
  default, weighted = _args("--arms=onegen_infonce,git_pipeline,rit"), _args(
      "--arms=onegen_infonce,git_pipeline,rit", "--lambda_ret=0.5")
  joint = _arm(weighted, "onegen_infonce")
  assert (joint.key, joint.loss.lambda_ret, joint.loss.lambda_gen) == (
      "onegen_infonce@lambda_ret=0.5", 0.5, 1.0)
  assert label(joint.key) == "OneGen, InfoNCE (lambda_ret=0.5)"
  fp = lambda args, name, **kw: cli.fingerprint(args, "rag", _arm(args, name), **kw)
  assert fp(default, "onegen_infonce") != fp(weighted, "onegen_infonce")
  for name in ("git_pipeline", "rit"):
    assert _arm(weighted, name).loss == BY_NAME[name].loss and _arm(weighted, name).key == name
    assert fp(default, name) == fp(weighted, name)
    assert fp(default, name, training=True) == fp(weighted, name, training=True)
  warm = _args("--arms=onegen_infonce,onegen_bpr,rit_infonce", "--temperature=0.05")
  cold = _args("--arms=onegen_infonce,onegen_bpr,rit_infonce")
  assert _arm(warm, "rit_infonce").loss.temperature == 0.05
  assert fp(warm, "onegen_bpr") == fp(cold, "onegen_bpr")
  assert fp(warm, "rit_infonce") != fp(cold, "rit_infonce")


def test_in_batch_arm_trains_without_own_negatives():
  """onegen_infonce_in_batch samples no own negative (n_neg 0); the other arms keep the task's."""
  args = _args("--arms=onegen_infonce,onegen_infonce_in_batch", "--rag_n_neg=2")
  configs = _train_configs(args, "rag")
  assert configs["onegen_infonce_in_batch"].data.n_neg_per_pos == 0
  assert configs["onegen_infonce"].data.n_neg_per_pos == 2
  assert configs["onegen_infonce"].batch.num_negatives == 2
  for c in configs.values():
    assert (c.loss.loss_type, c.loss.temperature) == ("infonce", 0.02)
  assert (cli.fingerprint(args, "rag", _arm(args, "onegen_infonce"))
          != cli.fingerprint(args, "rag", _arm(args, "onegen_infonce_in_batch")))


def test_wide_arm_trains_four_micro_batches_per_step_with_shared_negatives():
  args = _args("--arms=onegen_infonce,onegen_infonce_wide")
  plain, wide = _train_configs(args, "rag").values()
  assert (wide.batch.rows, wide.batch.accum_steps) == (4 * plain.batch.rows, 4)
  assert wide.batch.num_queries == plain.batch.num_queries  # per micro-batch, unchanged
  assert wide.loss.negatives_across_micro_batches and not plain.loss.negatives_across_micro_batches


def test_lora_arm_trains_adapters_over_the_imported_base_with_the_same_batches():
  """onegen_infonce_lora: LoRA rank 16 over model.init_from (the imported model) in bf16, the
  task tokens' rows trained, every other setting onegen_infonce's; its own fingerprint, and the
  full arms' fingerprints do not move (their finished runs stay reusable)."""
  args = _args("--arms=onegen_infonce,onegen_infonce_lora")
  full, lora = _train_configs(args, "el", "bfloat16").values()
  assert not full.lora.enabled and lora.model.init_from == "/tmp/run"
  assert (lora.lora.enabled, lora.lora.rank, lora.lora.base_dtype) == (True, 16, "bfloat16")
  assert lora.lora.trainable_tokens == "added"
  lora.lora, full.lora = full.lora, full.lora
  assert lora.to_dict() == full.to_dict()
  plain = cli.fingerprint(args, "el", _arm(args, "onegen_infonce"))
  assert plain != cli.fingerprint(args, "el", _arm(args, "onegen_infonce_lora"))
  assert plain == cli.fingerprint(_args("--arms=onegen_infonce"), "el",
                                  _arm(_args("--arms=onegen_infonce"), "onegen_infonce"))


def test_the_fast_lora_arm_differs_from_the_lora_arm_by_its_learning_rate_only():
  args = _args("--arms=onegen_infonce_lora,onegen_infonce_lora_lr10")
  lora, fast = _train_configs(args, "el", "bfloat16").values()
  assert fast.optim.lr == 10 * lora.optim.lr == 10 * args.lr
  fast.optim.lr = lora.optim.lr
  assert fast.to_dict() == lora.to_dict()
  assert (cli.fingerprint(args, "el", _arm(args, "onegen_infonce_lora"))
          != cli.fingerprint(args, "el", _arm(args, "onegen_infonce_lora_lr10")))


def test_the_document_text_arms_differ_from_onegen_infonce_by_that_weight_only():
  """onegen_infonce_docs_ctx (weight 0) and _docs_tenth (0.1) train the same batches with
  data.document_text_weight changed, each under its own fingerprint."""
  names = ("onegen_infonce", "onegen_infonce_docs_ctx", "onegen_infonce_docs_tenth")
  args = _args("--arms=" + ",".join(names))
  configs = _train_configs(args, "rag")
  assert [configs[n].data.document_text_weight for n in names] == [1.0, 0.0, 0.1]
  for name in names[1:]:
    configs[name].data.document_text_weight = 1.0
    assert configs[name].to_dict() == configs["onegen_infonce"].to_dict()
  assert len({cli.fingerprint(args, "rag", _arm(args, n)) for n in names}) == 3


def test_the_document_text_weight_flag_is_a_lever_of_the_joint_arms():
  """--document_text_weight sets a joint arm's weight (its key, config and fingerprint), leaves
  the generation-only arm alone, and at an arm's own value changes nothing (same key and
  fingerprint as without the flag); a negative weight is refused."""
  names = "--arms=onegen_infonce,git_pipeline,onegen_infonce_docs_tenth"
  plain, third, tenth = _args(names), _args(names, "--document_text_weight=0.3"), _args(
      names, "--document_text_weight=0.1")
  joint = _arm(third, "onegen_infonce")
  assert joint.key == "onegen_infonce@document_text_weight=0.3"
  assert label(joint.key) == "OneGen, InfoNCE (document_text_weight=0.3)"
  assert _train_configs(third, "rag")["onegen_infonce"].data.document_text_weight == 0.3
  fp = lambda args, name: cli.fingerprint(args, "rag", _arm(args, name))
  assert fp(third, "onegen_infonce") != fp(plain, "onegen_infonce")
  assert _arm(third, "git_pipeline") == _arm(plain, "git_pipeline")
  assert fp(third, "git_pipeline") == fp(plain, "git_pipeline")
  assert _arm(tenth, "onegen_infonce_docs_tenth") == _arm(plain, "onegen_infonce_docs_tenth")
  assert fp(tenth, "onegen_infonce_docs_tenth") == fp(plain, "onegen_infonce_docs_tenth")
  with pytest.raises(SystemExit):
    _args(names, "--document_text_weight=-1")


def test_rag_dev_keeps_multi_hop_questions_and_trains_the_others():
  single, double = _line(("p1", ["n1"])), _line(("p2", ["n2"]), ("p3", ["n3"]))
  train, dev = data.multi_hop_dev([_line(("p0", ["n0"]))], [single, double])
  assert dev == [double]
  assert train[1:] == [single] and len(train) == 2


def test_pool_is_the_dev_paragraphs_then_the_first_distractors():
  db = [{"uid": u} for u in ("p1", "n1", "x1", "x2", "x3", "other")]
  dev = [_line(("p1", ["n1"]))]
  uids = lambda pool: [d["uid"] for d in pool]
  assert uids(data._pool(db, dev, ["n1", "x1", "x2", "x3"], 2)) == ["p1", "n1", "x1", "x2"]
  assert uids(data._pool(db, dev, ["x1", "x2", "x3"], -1)) == ["p1", "n1", "x1", "x2", "x3"]
  assert uids(data._pool(db, dev, ["x1"], 0)) == ["p1", "n1"]


def test_per_set_recall_ranks_each_sets_queries_against_the_whole_pool():
  scores = ranking.DocScores(["a", "b", "c"], np.asarray([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0],
                                                          [0.0, 0.1, 0.7]], np.float32))
  anchors = [ranking.GoldAnchor(i, 0, frozenset([g]), ("a", "b"), "") for i, g in
             enumerate(("a", "c", "c"))]
  sub = ranking.rows(scores, [1, 2])
  assert ranking.hits(sub, anchors[1:], 1, False) == 0.5  # query 1 ranks b first, query 2 c
  assert ranking.hits(sub, anchors[1:], 1, True) == 0.0  # c is no candidate of theirs


def test_rag_table_has_a_row_per_arm_and_set():
  result = ArmResult(gold=GoldRecall(pool_r1=0.5, by_set={"hotpot": {"cand_r1": 0.75,
                                                                     "pool_r1": 0.25}}),
                     generation=Generation(em=0.1, f1=0.2, ran_to_limit=3, first_query_p=0.25,
                                           by_set={"hotpot": {"em": 0.125, "f1": 0.5}}))
  text = report.table("rag", {"onegen_infonce@lambda_ret=0.5": result}, 2)
  assert ("| OneGen, InfoNCE (lambda_ret=0.5) | 10.0 | 20.0 | — | — | — | — | 50.0 | — | — | "
          "0.250 | 3 | — | — | — | — | — |") in text  # ... emitted / gold, P(query first), loops
  assert "| OneGen, InfoNCE (lambda_ret=0.5) | hotpot | 12.5 | 50.0 | 75.0 | 25.0 |" in text


def test_the_candidate_prior_raises_each_candidate_by_its_rank_only_among_candidates():
  """with_prior adds weight x log_prior[rank] to each anchor's candidates (rank: their order in
  the data) and leaves other documents alone; the prior can overturn a close cosine."""
  from onegen_jax.retrieval.candidates import RankPrior
  scores = ranking.DocScores(["a", "b", "c"], np.asarray([[0.50, 0.55, 0.9]], np.float32))
  anchor = ranking.GoldAnchor(0, 0, frozenset(["a"]), ("a", "b"), "")
  prior = RankPrior(0.1, (-0.1, -2.0))
  combined = ranking.with_prior(scores, [anchor], prior)
  np.testing.assert_allclose(combined.matrix, [[0.50 - 0.01, 0.55 - 0.2, 0.9]], rtol=1e-6)
  assert ranking.hits(scores, [anchor], 1, True) == 0.0
  assert ranking.hits(combined, [anchor], 1, True) == 1.0


# --- data shaping (sources.py, data.py) -----------------------------------------------------

def _word_count(text):
  """A token counter that counts words (the chunker's `count(a, b)`)."""
  import re
  starts = [m.start() for m in re.finditer(r"\S+", text)]
  return lambda a, b: sum(a <= s < b for s in starts)


def test_pieces_end_at_sentence_ends_within_the_limits_and_never_inside_a_mention():
  from benchmarks.quality import sources
  text = "Alpha beta gamma. Delta epsilon zeta eta. Theta iota. Kappa lambda mu nu xi omicron."
  count = _word_count(text)
  bounds = sources.piece_bounds(text, [], count, sources.Chunking(max_tokens=7, max_sentences=0))
  pieces = [text[a:b].strip() for a, b in bounds]
  assert pieces == ["Alpha beta gamma. Delta epsilon zeta eta.", "Theta iota.",  # 7 words, 2
                    "Kappa lambda mu nu xi omicron."]  # 2 + 6 would pass 7
  assert [a for a, _ in bounds][1:] == [b for _, b in bounds][:-1]  # consecutive, covering
  # A mention across the second sentence end keeps both sentences in one piece.
  span = (text.index("eta."), text.index("iota") + 4)
  bounds = sources.piece_bounds(text, [span], count, sources.Chunking(max_tokens=4,
                                                                       max_sentences=0))
  assert not any(span[0] < b < span[1] for _, b in bounds)
  # One sentence over the limit is cut at word ends.
  long = "one two three four five six seven."
  bounds = sources.piece_bounds(long, [], _word_count(long), sources.Chunking(3, 0))
  assert [long[a:b].strip() for a, b in bounds] == ["one two three", "four five six", "seven."]


def test_a_chunked_document_keeps_every_mention_at_its_shifted_offsets():
  from benchmarks.quality import sources

  class Words:  # the HF tokenizer's offsets, one token per word
    def __call__(self, text, add_special_tokens, return_offsets_mapping):
      import re
      return {"offset_mapping": [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]}

  text = "Paris is big. Berlin is old. Rome is far away from here."
  mentions = [{"start": text.index(w), "end": text.index(w) + len(w), "surface": w}
              for w in ("Paris", "Berlin", "Rome")]
  pieces = sources.chunk_document({"doc_id": "d", "text": text, "mentions": mentions}, Words(),
                                  sources.Chunking(max_tokens=6, max_sentences=0))
  assert [p["doc_id"] for p in pieces] == ["d#0", "d#1"]
  found = [(p["text"][m["start"]:m["end"]], m["surface"]) for p in pieces for m in p["mentions"]]
  assert found == [("Paris", "Paris"), ("Berlin", "Berlin"), ("Rome", "Rome")]


def test_template_field_reads_back_what_the_template_wrote():
  template = "Title: {title}\nWrite {{braces}} about it."
  assert data.template_field(template, "title", "x " + template.format(title="Ada Lovelace")) == \
      "Ada Lovelace"
  assert data.template_field(template, "input", "anything") is None
  assert data.template_field(template, "title", "unrelated text") is None


def test_round_robin_takes_the_sets_in_turn_and_keeps_file_order():
  sets = ["a", "a", "a", "b", "c", "c"]
  assert data._round_robin(sets, 4) == [0, 1, 3, 4]
  assert data._round_robin(sets, 0) == list(range(6))


def test_packable_examples_are_those_the_packer_can_place_with_their_documents():
  """An example fits when it and the documents of its anchors' first positive and n_neg
  negatives go first-fit into empty rows."""
  args = _args("--rag_rows=2", "--rag_seq_len=512", "--rag_n_neg=1")
  settings = cli.TaskSettings.from_args(args, "rag")
  line = _line(("p", ["n", "m"]))
  fits = lambda n, doc: data._packable([line], np.asarray([n]), {"p": doc, "n": doc, "m": doc},
                                       settings)[0]
  assert fits(300, 200)  # rows: 300 + 200, 200
  assert not fits(300, 300)  # 300, 300, 300 into two rows of 512
  assert not fits(600, 10)  # longer than a row


def test_a_limited_db_keeps_every_listed_document_then_random_others():
  db = [{"uid": f"d{i}"} for i in range(10)]
  kept = data._limit_db(db, [_line(("d7", ["d8"]))], 4, np.random.default_rng(0))
  uids = [d["uid"] for d in kept]
  assert len(uids) == 4 and {"d7", "d8"} <= set(uids)
  assert uids == sorted(uids, key=lambda u: int(u[1:]))  # db order


# --- ranking and results -----------------------------------------------------------------

def test_a_document_scores_by_its_best_key_and_ties_rank_by_uid():
  queries = np.asarray([[1.0, 0.0]], np.float32)
  keys = np.asarray([[0.2, 0.9], [0.8, 0.6], [0.8, 0.6]], np.float32)
  scores = ranking.from_keys(queries, keys, ["b-0", "b-1", "a"])  # b's keys b-0, b-1; a
  assert scores.uids == ["b", "a"]
  np.testing.assert_allclose(scores.matrix, [[0.8, 0.8]])
  tie = ranking.GoldAnchor(0, 0, frozenset(["b"]), ("b", "a"), "")
  assert ranking.hits(scores, [tie], 1, False) == 0.0  # a equal score: "a" < "b" wins
  assert ranking.hits(scores, [tie], 2, False) == 1.0


def test_a_saved_arm_is_reused_only_under_its_fingerprint(tmp_path):
  from benchmarks.quality.results import load_arm, save_arm
  result = ArmResult(gold=GoldRecall(cand_r1=0.5, by_set={"s": {"cand_r1": 0.5}}), eval_s=3.0)
  save_arm(str(tmp_path / "arm.json"), result, "abc")
  assert load_arm(str(tmp_path / "arm.json"), "abc") == result
  assert load_arm(str(tmp_path / "arm.json"), "abd") is None
  assert load_arm(str(tmp_path / "missing.json"), "abc") is None


def test_the_prior_and_minilm_arms_evaluate_onegen_infonces_own_training_run():
  """onegen_infonce_prior (EL) and onegen_infonce_with_minilm (RAG, with a lever) train nothing
  of their own: their training directory is onegen_infonce's (same loss, same fingerprint);
  their results files are their own."""
  from benchmarks.quality.__main__ import _paths
  for mode, other, flags in (("el", "onegen_infonce_prior", ()),
                             ("rag", "onegen_infonce_with_minilm", ("--lambda_ret=0.03",))):
    args = _args(f"--arms=onegen_infonce,{other}", *flags)
    plain, arm = cli.study_arms(args)
    assert _paths(args, mode, arm)[1] == _paths(args, mode, plain)[1]
    assert _paths(args, mode, arm)[0] != _paths(args, mode, plain)[0]


@pytest.mark.parametrize("flag, name", [("--loop_repeats=3", "loop_repeats"),
                                        ("--novel_documents", "novel_documents")])
def test_an_evaluation_flag_reevaluates_an_arm_apart_from_its_plain_evaluation(flag, name):
  """--loop_repeats and --novel_documents change only the evaluation: the training directory is
  the plain run's, the result file, evaluation directory and fingerprint are their own; off they
  leave every fingerprint as it was before the flag existed (left out of the hash, as if
  absent)."""
  from benchmarks.quality.__main__ import _paths
  plain = _args("--arms=onegen_infonce")
  other = _args("--arms=onegen_infonce", flag)
  arm = _arm(plain, "onegen_infonce")
  assert _paths(other, "rag", arm)[1] == _paths(plain, "rag", arm)[1]
  assert _paths(other, "rag", arm)[0] != _paths(plain, "rag", arm)[0]
  assert _paths(other, "rag", arm)[2] != _paths(plain, "rag", arm)[2]
  assert cli.fingerprint(other, "rag", arm) != cli.fingerprint(plain, "rag", arm)
  assert (cli.fingerprint(other, "rag", arm, training=True)
          == cli.fingerprint(plain, "rag", arm, training=True))
  absent = _args("--arms=onegen_infonce")
  delattr(absent, name)
  assert cli.fingerprint(absent, "rag", arm) == cli.fingerprint(plain, "rag", arm)


def test_the_loops_column_counts_what_the_loop_stop_ended_when_it_was_on():
  loops = report._loops  # pylint: disable=protected-access
  assert loops(Generation(ran_to_limit=10)) == "10"
  assert loops(Generation(ran_to_limit=2, loop_stopped=8)) == "2 (+8 ended by the loop stop)"


def test_the_evaluation_dtype_names_the_evaluation_not_the_training():
  """--eval_dtype is evaluation only: the same training run, another evaluation fingerprint."""
  arm = _arm(_args("--arms=onegen_infonce"), "onegen_infonce")
  f32, bf16 = (_args("--arms=onegen_infonce", f"--eval_dtype={d}") for d in ("float32", "bfloat16"))
  assert cli.fingerprint(f32, "el", arm) != cli.fingerprint(bf16, "el", arm)
  assert (cli.fingerprint(f32, "el", arm, training=True)
          == cli.fingerprint(bf16, "el", arm, training=True))
