"""What a model *is*: the GGUF file (`gguf_file`: metadata, tensor directory, checks that name the
file), its architecture (`arch/`: one module per ``general.architecture``, each a frozen args
dataclass built from the GGUF keys and a function that writes a layer range's graph), its
tokenizer (`tokenizer`, with the byte-level BPE, SentencePiece and special-token parts beside it)
and its chat template (`chat_template`, a sandboxed jinja2). Nothing here runs a model or knows a
backend, a slot or a request: the engine builds on this package, never the other way round."""
