"""deploy/ cannot rot silently: every command in compose.yaml and the systemd unit parses with the
program's own parser, the files they name are the ones make-certs.sh makes (read as the programs
read them), the frontend dials nodes by the names in their certificates, and the Dockerfile copies
every package pyproject.toml installs. Nothing is built and Docker is not needed."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROGRAMS = ("llamarpc", "llamarpc-server")


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


def _parse(program: str, argv: list[str]):
    if program == "llamarpc":
        from llamarpc.frontend.cli.args import build_parser
    else:
        from llamarpc.rpcserver.cli import build_parser
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{program} {shlex.join(argv)}: its parser refused it (exit {e.code})")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl: make-certs.sh cannot run")
    out = tmp_path_factory.mktemp("secrets")
    r = subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_interpolate((DEPLOY / "compose.yaml").read_text()))


def _container_paths(compose: dict, service: dict, secrets: Path, tmp: Path) -> dict[str, Path]:
    """Where each path the container sees comes from here: its secrets and (stand-ins for) its volumes."""
    paths: dict[str, Path] = {}
    for name in service.get("secrets", []):
        src = compose["secrets"][name]["file"]
        assert src.startswith("./secrets/"), src
        paths[f"/run/secrets/{name}"] = secrets / src[len("./secrets/"):]
    for vol in service.get("volumes", []):
        _, target = vol.split(":")[:2]
        stand_in = tmp / target.strip("/").replace("/", "_")
        stand_in.mkdir(parents=True, exist_ok=True)
        paths[target] = stand_in
    return paths


def _localize(argv: list[str], paths: dict[str, Path]) -> list[str]:
    out = []
    for a in argv:
        for target, here in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            if a == target or a.startswith(target + "/"):
                a = str(here) + a[len(target):]
                break
        out.append(a)
    return out


def test_compose_commands_parse_and_read_their_files(compose, secrets, tmp_path):
    from llamarpc.frontend.cli.server import settings_from_args
    from llamarpc.proto.cliargs import read_file

    services = compose["services"]
    assert {"node1", "node2", "frontend"} <= set(services)
    seen = set()
    for name, svc in services.items():
        if name == "prometheus":
            continue
        program = svc["entrypoint"][0]
        assert program in PROGRAMS, (name, program)
        seen.add(program)
        paths = _container_paths(compose, svc, secrets, tmp_path / name)
        argv = _localize([str(a) for a in svc["command"]], paths)
        if program == "llamarpc":
            model = Path(argv[argv.index("-m") + 1])
            model.parent.mkdir(parents=True, exist_ok=True)
            model.touch()       # -m is checked for existence at parse time; nothing is loaded here
            args = _parse(program, argv)
            settings = settings_from_args(args)     # reads the TLS files, API keys, token and CA
            assert settings.api_keys and args.rpc_token_file and args.rpc_tls_ca and args.ssl_cert_file
            for node in args.rpc.split(","):
                host = node.rsplit(":", 1)[0]
                assert host in services, f"--rpc names {host}, which is no service"
                # gRPC checks the node's certificate against the host it dials
                cert = secrets / Path(compose["secrets"][f"{host}_cert"]["file"]).name
                r = subprocess.run(["openssl", "verify", "-CAfile", args.rpc_tls_ca, "-verify_hostname", host, str(cert)],
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stdout + r.stderr
        else:
            args = _parse(program, argv)
            assert args.host == "0.0.0.0" and args.auth_token_file and args.tls_cert and args.tls_key
            for flag, path in (("--auth-token-file", args.auth_token_file), ("--tls-cert", args.tls_cert),
                               ("--tls-key", args.tls_key)):
                assert read_file(flag, path).strip(), (name, flag)
            assert args.cache_dir.startswith(str(paths["/var/cache/llamarpc"]))
    assert seen == set(PROGRAMS)


def test_compose_token_is_shared(compose):
    """Every node and the frontend read the same token secret."""
    for name, svc in compose["services"].items():
        if name == "prometheus":
            continue
        flag = "--rpc-token-file" if svc["entrypoint"][0] == "llamarpc" else "--auth-token-file"
        cmd = svc["command"]
        assert cmd[cmd.index(flag) + 1] == "/run/secrets/token", name
        assert "token" in svc["secrets"], name


def test_systemd_unit_parses(secrets, tmp_path):
    text = (DEPLOY / "llamarpc-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    creds = dict(m.groups() for m in re.finditer(r"^LoadCredential=([^:]+):(.*)$", text, re.M))
    # %d: the credentials directory (each LoadCredential's name in it), %C: the cache root
    creddir = tmp_path / "creds"
    creddir.mkdir()
    here = {"token": secrets / "token", "node.pem": secrets / "node1.pem", "node-key.pem": secrets / "node1-key.pem"}
    assert set(creds) == set(here)
    for cname, src in here.items():
        (creddir / cname).write_bytes(src.read_bytes())
    argv = shlex.split(exec_start.replace("%d", str(creddir)).replace("%C", str(tmp_path / "cache")))
    assert Path(argv[0]).name == "llamarpc-server"
    args = _parse("llamarpc-server", argv[1:])
    assert args.auth_token_file == str(creddir / "token") and args.tls_key == str(creddir / "node-key.pem")


def test_dockerfile_copies_every_package():
    import tomllib

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    tops = {d.split("/")[0] for d in dirs}
    assert tops <= copied, f"the Dockerfile does not COPY {sorted(tops - copied)}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(PROGRAMS)


def test_prometheus_scrapes_the_frontend_as_compose_runs_it(compose):
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    svc = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svc["volumes"]
    front = compose["services"]["frontend"]["command"]
    assert "--metrics" in front
    port = front[front.index("--port") + 1]
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"frontend:{port}"]
    # HTTPS (the frontend has --ssl-*) with the API key (it has --api-key-file), both as compose secrets
    assert job["scheme"] == "https" and "--ssl-cert-file" in front and "--api-key-file" in front
    for path in (job["tls_config"]["ca_file"], job["authorization"]["credentials_file"]):
        assert path.startswith("/run/secrets/") and path.rsplit("/", 1)[1] in svc["secrets"], path
