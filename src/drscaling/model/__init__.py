"""The dense retriever: f(x) = Linear(pool(Transformer(x))), score = <f_q(q), f_p(p)>.

By default one shared encoder embeds queries and passages (the paper's setting); `Towers` also holds
two separate ones (ScalingNote's dual towers). The zoo names the paper's 24 BERT-miniature shapes;
each is built from config (offline default, with a WordPiece vocabulary trained on the training
corpus) or loaded from a pretrained checkpoint (local folder or hub name). Two more families:
`minilm-L{k}` (a pretrained encoder cut to k layers) and decoder LLMs such as `smollm2-135m`
(SmolLM2-135M-Instruct, ScalingNote's LLM-initialised towers).

    shapes.py      the shape names (zoo, pretrained series, decoder LLMs), their sizes and weights
    tokenizer.py   the trained WordPiece vocabulary, loading, tokenising; which tokenizer a shape uses
    encoder.py     Encoder (backbone, pooling, projection), Towers, ModelMeta, N (non-embedding parameters)
    build.py       build_model: an Encoder of a shape, from config or a checkpoint, and its head's start
    retriever.py   Tower and Retriever (encoders with their tokenizer), encode: texts to embeddings
    saved.py       the saved model folder: save_model / load_model, save_retriever / load_retriever

A saved model is a folder:
    backbone/            HF `save_pretrained` of the transformer (config.json + weights)
    tokenizer/           HF tokenizer files (the client tokenises; the tokenizer travels with it)
    projection.pt        state dict of the Linear(hidden, dim) head
    drscaling.json       ModelMeta: shape, pooling, dim, N, max lengths
A saved dual-tower model is a folder holding two such folders, `query/` and `passage/`, and
`towers.json`; `load_retriever` reads either kind.

Nothing is imported here: a caller imports the module it uses (shapes.py needs no torch).
"""
