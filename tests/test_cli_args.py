"""Both command lines (issue 11's table): every bad input is one `error:` line naming the flag,
the variable or the file; llama-server's no-effect flags are accepted with a note; the help text
lists every flag's environment variable. Everything runs in process and stops before loading."""
from __future__ import annotations

import logging
import socket

import pytest
from llamarpc.frontend.cli import args as fargs
from llamarpc.frontend.cli.main import main as frontend_main
from llamarpc.rpcserver import cli as rcli
from synth import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "m.gguf"
    write_model(path, n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, seed=1)
    return str(path)


def _one_error_line(text: str, *needles: str) -> None:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "error:" in lines[0] and "Traceback" not in text
    for n in needles:
        assert n in lines[0], lines[0]


def _parse_fails(parser, argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, *needles)


# (argv, words the one error line must hold): the CLI rows and their neighbours
FRONTEND_ERRORS = [
    (["--port", "99999"], ("--port", "out of range")),
    (["--port", "-1"], ("--port", "out of range")),
    (["-n", "-5"], ("-n/--n-predict", "out of range")),
    (["-c", "-1"], ("-c/--ctx-size", "out of range")),
    (["-ts", "abc"], ("-ts/--tensor-split", "abc")),
    (["-m", "/tmp"], ("-m/--model", "is a directory")),
    (["-m", "/no/such.gguf"], ("-m/--model", "no such file")),
    (["--n-pred", "3"], ("--n-pred",)),                  # no prefix abbreviations
    (["-xyz", "3"], ("unknown flag -xyz",)),             # not read as -x yz
    (["-np", "0"], ("-np/--parallel",)),
    (["--temp", "nan"], ("--temp",)),
    (["--top-p", "2"], ("--top-p", "out of range")),
    (["-s", str(2**40)], ("-s/--seed", "out of range")),
    (["-ctk", "q4_0"], ("-ctk/--cache-type-k",)),
]


@pytest.mark.parametrize("argv,needles", FRONTEND_ERRORS)
def test_frontend_bad_flags(argv, needles, capsys):
    _parse_fails(fargs.build_parser(), argv, capsys, *needles)


@pytest.mark.parametrize("var,value,needles", [
    ("LLAMA_ARG_N_PREDICT", "abc", ("LLAMA_ARG_N_PREDICT", "abc")),
    ("LLAMA_ARG_PORT", "70000", ("LLAMA_ARG_PORT", "out of range")),
    ("LLAMA_ARG_ENDPOINT_METRICS", "maybe", ("LLAMA_ARG_ENDPOINT_METRICS", "boolean")),
    ("LLAMA_ARG_TEMP", "hot", ("LLAMA_ARG_TEMP",)),
    ("LLAMA_ARG_CACHE_TYPE_K", "q8", ("LLAMA_ARG_CACHE_TYPE_K", "f32")),
])
def test_frontend_bad_variables(var, value, needles, monkeypatch, capsys):
    monkeypatch.setenv(var, value)
    _parse_fails(fargs.build_parser(), [], capsys, *needles)


def test_variables_are_read_and_flags_win(monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_N_PREDICT", "7")
    monkeypatch.setenv("LLAMA_ARG_TEMP", "0.3")
    monkeypatch.setenv("LLAMA_ARG_ENDPOINT_SLOTS", "1")
    monkeypatch.setenv("LLAMA_API_KEY", "a,b")
    a = fargs.build_parser().parse_args(["--temp", "0.5"])
    assert a.n_predict == 7 and a.temp == 0.5 and a.slots is True and a.api_key == ["a", "b"]
    b = fargs.build_parser().parse_args(["--no-slots", "-n", "-2"])
    assert b.slots is False and b.n_predict == -2


@pytest.mark.parametrize("argv", [["-ngl", "99"], ["--n-gpu-layers", "99"], ["--mlock"], ["--no-mmap"], ["-fa"],
                                  ["-fa", "on"], ["-dev", "CUDA0"], ["-ngld", "99"], ["-sm", "row"], ["-cb"]])
def test_no_effect_flags_accepted_with_a_note(argv, caplog):
    with caplog.at_level(logging.WARNING, logger="llamarpc.proto.cliargs"):
        a = fargs.build_parser().parse_args(["-p", "hi", *argv])
    assert a.prompt == "hi" and a.n_predict == -1 and a.model is None   # -ngl is not -n gl, -ngld not -n gld
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and argv[0] in notes[0] and "no effect" in notes[0]


@pytest.mark.parametrize("argv,needles", [
    (["--rpc", "127.0.0.1:1", "--rpc-token-file", "/no/such"], ("--rpc-token-file", "no such file")),
    (["--rpc", "127.0.0.1:1", "--rpc-token-file", "/tmp"], ("--rpc-token-file", "is a directory")),
    (["--api-key-file", "/no/such"], ("--api-key-file", "no such file")),
    (["--chat-template-file", "/tmp"], ("--chat-template-file", "is a directory")),
    (["--ssl-key-file", "/no/k", "--ssl-cert-file", "/no/c"], ("--ssl-key-file", "no such file")),
])
def test_frontend_files_one_message(model, argv, needles, capsys):
    """Server mode: the flags are checked before anything loads or listens."""
    assert frontend_main(["-m", model, "--port", "0", *argv]) == 2
    _one_error_line(capsys.readouterr().err, *needles)


def test_oneshot_rpc_token_file_missing(model, capsys):
    assert frontend_main(["-m", model, "-p", "hi", "--rpc", "127.0.0.1:1", "--rpc-token-file", "/no/such"]) == 1
    _one_error_line(capsys.readouterr().err, "--rpc-token-file", "no such file")


def test_frontend_help_shows_both_modes_and_every_variable():
    text = fargs.build_parser().format_help()
    assert "one-shot" in text and "server" in text and "-p is the prompt" in text and "-p is the port" in text
    for f in fargs.FLAGS:
        if f.env:
            assert f.env in text, f.env


@pytest.mark.parametrize("argv,needles", [
    (["--port", "99999"], ("-p/--port", "out of range")),
    (["--keepalive", "0"], ("--keepalive", "out of range")),
    (["--max-sessions", "0"], ("--max-sessions",)),
    (["-m", "-4"], ("-m/--reserve-memory",)),
    (["--threads", "x"], ("-t/--threads",)),
])
def test_node_bad_flags(argv, needles, capsys):
    _parse_fails(rcli.build_parser(), argv, capsys, *needles)


def test_node_bad_variable(monkeypatch, capsys):
    monkeypatch.setenv("LLAMARPC_CACHE_SIZE", "lots")
    _parse_fails(rcli.build_parser(), [], capsys, "LLAMARPC_CACHE_SIZE")


@pytest.mark.parametrize("path,needle", [("/no/such", "no such file"), ("/tmp", "is a directory")])
def test_node_token_file_one_message(path, needle, capsys):
    assert rcli.main(["--auth-token-file", path, "-c", ""]) == 2
    _one_error_line(capsys.readouterr().err, "--auth-token-file", needle)


def test_node_busy_port_one_line(capfd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert rcli.main(["--port", str(port), "-c", "", "--mem", "64"]) == 1
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower() or "add_port" in ln]
    assert len(lines) == 1 and "Address already in use" in lines[0] and "add_port" not in err, err


def test_node_help_shows_both_modes_and_every_variable():
    text = rcli.build_parser().format_help()
    assert "LLAMARPC_MEM" in text and "LLAMARPC_CACHE_SIZE" in text and "-p is the port" in text
    assert "frontend" in text and "node" in text
    for f in rcli.FLAGS:
        if f.env:
            assert f.env in text, f.env
