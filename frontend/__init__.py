"""The frontend: GGUF, tokenizer, chat templates, model graphs, engine, sampling, CLI and HTTP API."""
