"""The prompts a generator is given, and which one a source and model get by default."""

from __future__ import annotations

from drscaling.errors import DrscalingError

# The paper's Appendix A prompt. The PDF text wraps two lines (marked "⇒") and numbers the last
# line "7"; rejoined here, the wording is the paper's.
APPENDIX_A_PROMPT = (
    "Please generate 5 relevant queries according to the given passage for search purpose.\n"
    "1. Each query should be relevant to the passage.\n"
    "2. Each query should be around 10 to 20 words.\n"
    "3. Please generate diverse queries.\n"
    '4. Output in JSON format, with keys: "query1", "query2", "query3", "query4", "query5".\n'
    "5. Please respond in English. DO NOT use Chinese.\n"
    "Passage: {passage}"
)

# For the 135M local model: three hand-written, out-of-domain examples (not from any split), so the
# source stays zero-shot with respect to the dataset's own annotations.
FEW_SHOT_PROMPT = (
    "Passage: The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    " It was designed by Gustave Eiffel's company and completed in 1889 for the World's Fair.\n"
    "Query: when was the eiffel tower built\n\n"
    "Passage: Git is a distributed version control system that tracks changes in source code during"
    " software development. Every working copy is a full repository with complete history.\n"
    "Query: what is git version control\n\n"
    "Passage: Vitamin C is found in citrus fruits such as oranges and lemons, as well as in"
    " strawberries, peppers and broccoli. It helps the body absorb iron and supports the immune system.\n"
    "Query: foods high in vitamin c\n\n"
    "Passage: {passage}\nQuery:"
)

# The fine-tuned decoder's format: what it is trained on is exactly what it is prompted with.
PASSAGE_QUERY_PROMPT = "Passage: {passage}\nQuery:"
# docT5query's format: the passage is the whole encoder input.
PASSAGE_PROMPT = "{passage}"

PROMPTS = {
    "appendix_a": APPENDIX_A_PROMPT,
    "few_shot": FEW_SHOT_PROMPT,
    "passage_query": PASSAGE_QUERY_PROMPT,
    "passage": PASSAGE_PROMPT,
}
CHAT_PROMPTS = ("appendix_a",)  # sent as a chat message; the others are plain completions
# Appendix A asks for five ~20-word queries in JSON (~200 tokens); the others want one line.
DEFAULT_MAX_NEW_TOKENS = {"appendix_a": 320, "few_shot": 32, "passage_query": 32, "passage": 32}


def resolve_prompt(prompt: str, source: str, seq2seq: bool, local: bool) -> str:
    """`auto`: Appendix A for an endpoint; the few-shot completion prompt for the local small model
    (it copies the passage under the chat prompt); the fine-tuning format for `supervised`."""
    if prompt != "auto":
        if prompt not in PROMPTS:
            raise DrscalingError(f"prompt must be auto or one of {', '.join(PROMPTS)} (got {prompt!r})")
        if seq2seq and prompt != "passage":
            raise DrscalingError(f"a seq2seq model takes the passage alone: use prompt='passage' (got {prompt!r})")
        return prompt
    if seq2seq:
        return "passage"
    if source == "supervised":
        return "passage_query"
    return "few_shot" if local else "appendix_a"
