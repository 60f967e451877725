"""The frontend: `model/` (what a model is: GGUF, architectures, tokenizers, chat templates),
`sampling/`, `engine/` (loading and placing a model, slots, batching, the one generation loop),
`api/` (the HTTP server) and `cli/` (``llamarpc``); arrows cli -> api -> engine -> model."""
