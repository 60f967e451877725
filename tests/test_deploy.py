"""deploy/ cannot rot silently: every command in compose.yaml and the systemd unit parses with the
program's own parser, the files they name are the ones make-certs.sh makes (read as the programs
read them), the frontend dials nodes by the names in their certificates, and the Dockerfile copies
every package pyproject.toml installs; Prometheus scrapes every process as compose runs it, and
the dashboard's node panels query names a real node's /metrics serves. Nothing is built and
Docker is not needed."""
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
            assert args.metrics_port, name
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
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == {"llamarpc-frontend", "llamarpc-nodes"}
    job = jobs["llamarpc-frontend"]
    assert job["static_configs"][0]["targets"] == [f"frontend:{port}"]
    # HTTPS (the frontend has --ssl-*) with the API key (it has --api-key-file), both as compose secrets
    assert job["scheme"] == "https" and "--ssl-cert-file" in front and "--api-key-file" in front
    for path in (job["tls_config"]["ca_file"], job["authorization"]["credentials_file"]):
        assert path.startswith("/run/secrets/") and path.rsplit("/", 1)[1] in svc["secrets"], path


def test_prometheus_scrapes_every_node_as_compose_runs_it(compose):
    """Each llamarpc-server service at its --metrics-port, over HTTPS (the nodes have --tls-cert; the
    targets are the names in their certificates) with the token they read, from compose secrets."""
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "llamarpc-nodes"]
    svc = compose["services"]["prometheus"]
    want = []
    for name, node in compose["services"].items():
        if node.get("entrypoint", [""])[0] == "llamarpc-server":
            cmd = node["command"]
            assert "--tls-cert" in cmd and cmd[cmd.index("--auth-token-file") + 1] == "/run/secrets/token"
            want.append(f"{name}:{cmd[cmd.index('--metrics-port') + 1]}")
    assert len(want) == 2 and sorted(job["static_configs"][0]["targets"]) == sorted(want)
    assert job["scheme"] == "https" and job["authorization"]["credentials_file"] == "/run/secrets/token"
    for path in (job["tls_config"]["ca_file"], job["authorization"]["credentials_file"]):
        assert path.startswith("/run/secrets/") and path.rsplit("/", 1)[1] in svc["secrets"], path


def test_dashboard_node_panels_query_names_a_real_node_serves(tmp_path):
    """Every name the dashboard queries is the frontend's (tests/test_metrics.py checks those against
    a real frontend) or a node's: those are checked here against a node started with --metrics-port."""
    import json

    import httpx
    from metricsdoc import families
    from nodeproc import start_node

    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b([a-z_]+:[a-z_]+|process_[a-z_]+)", e)}
    unknown = {n for n in names if not n.startswith(("llamacpp:", "llamarpc:", "llamarpc_server:", "process_"))}
    assert not unknown, unknown
    node_names = {n for n in names if n.startswith("llamarpc_server:")}
    node_names |= {n for e in exprs if 'job="llamarpc-nodes"' in e for n in re.findall(r"\bprocess_[a-z_]+", e)}
    assert len(node_names) >= 10
    node = start_node(tmp_path, "--metrics-port", "0", "--mem", "64")
    try:
        m = re.search(r"metrics on (http://\S+/metrics)", node.stderr_text())
        assert m, node.stderr_text()
        r = httpx.get(m.group(1), timeout=10, trust_env=False)
        assert r.status_code == 200
        exported = {s[0] for fam in families(r.text).values() for s in fam}
    finally:
        node.stop()
    # a histogram's _bucket/_count, a counter's _total: the sample names are what a query names
    assert node_names <= exported, sorted(node_names - exported)
