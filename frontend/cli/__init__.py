"""The ``llamarpc`` command: `args` parses the flags (llama.cpp's names and LLAMA_ARG_* variables)
for both modes; `setup` turns them into threads, backends, a loaded model and an engine
configuration; `oneshot` runs one generation (-p / --chat) as one task of the engine, streamed to
stdout, with llama-cli's timings on stderr; `server` builds the HTTP server's settings and its
background loader; `main` picks the mode (``python -m llamarpc.frontend.cli`` runs it). The top
of the tree: it uses the API and the engine, and nothing imports it."""
