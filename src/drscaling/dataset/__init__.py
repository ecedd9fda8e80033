"""Importers from outside formats into the canonical dataset (see drscaling.data for the format).

    reading   strict line readers: every problem names the file, the line and what is wrong
    build     the shared last mile: de-duplication, leak-free carving into train/dev/test with exact
              sizes, size defaults that fit small data, an atomic write of the whole dataset
    snapshot  the Debian snapshot (data/debian/pairs.jsonl), split by source package (`drscaling prepare`)
    msmarco   MS MARCO passage files: collection.tsv, queries.<split>.tsv, qrels.<split>.tsv
    pairs     JSON lines of {"query", "passage"}
    beir      a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (graded scores kept)
    irds      any ir_datasets id, through the `ir_datasets` package (optional, imported lazily)

Each writes the format of drscaling.data, which knows none of them. Nothing is imported here.
"""
