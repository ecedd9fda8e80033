"""Importers from outside formats into the canonical dataset (see drscaling.data for the format).

    reading   strict line readers: every problem names the file, the line and what is wrong
    build     the shared last mile: de-duplication, leak-free carving into train/dev/test with exact
              sizes, size defaults that fit small data, an atomic write of the whole dataset
    pairs     JSON lines of {"query", "passage"}
    beir      a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (graded scores kept)
    irds      any ir_datasets id, through the `ir_datasets` package (optional, imported lazily)

Nothing is imported here, so drscaling.data can use these modules lazily without an import cycle.
"""
