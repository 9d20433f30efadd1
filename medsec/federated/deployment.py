"""Flower's deployment runtime: a SuperLink and one SuperNode per site, separate processes that talk
over TLS, each SuperNode authenticated by its own key pair, running medsec's ServerApp and ClientApp
(the same code as the simulation, so the run writes the same files).

``federation.backend=deployment`` starts it all on this machine's loopback (certificates, keys,
SuperLink, SuperNodes, ``flwr run``) under ``<run dir>/deployment/``; with
``federation.deployment.superlink=HOST:PORT`` it only submits the run to a SuperLink whose
SuperNodes run elsewhere (README, "Federated training"). ``python -m medsec.federated.deployment``
writes certificates and SuperNode keys for such a deployment.

What is authenticated: the SuperLink by its TLS certificate (the SuperNodes and ``flwr`` trust only
the CA they are given); each SuperNode by an EC P-384 key pair whose public half is registered with
the SuperLink (``--enable-supernode-auth``): it signs its requests, and unregistered nodes are
refused. The ServerApp and ClientApp processes talk to their own SuperLink/SuperNode on loopback.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from medsec.errors import ConfigError
from medsec.federated.client import PARTITION_ID, client_app, client_mods
from medsec.federated.sites import num_sites

log = logging.getLogger("medsec.federated")
APP_DIR = Path(__file__).with_name("flower_app")
"""The Flower App (``pyproject.toml``) that ``flwr run`` submits: it names :data:`server` and :data:`site`."""
CONFIG_KEY = "medsec-config"
"""Run config key (ServerApp) and node config key (SuperNode): the path of a resolved medsec config."""
CONNECTION = "medsec"
"""The SuperLink connection's name in the ``flwr`` CLI's config."""
STOP_SECONDS = 10.0


# ---- certificates and keys ----------------------------------------------------------------------
@dataclass(frozen=True)
class Certificates:
    """A CA certificate and the SuperLink's certificate and key it signed (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _certificate(subject: str, public: Any, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
                 days: int, extensions: list[tuple[Any, bool]]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public)
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def make_certificates(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> Certificates:
    """A new CA (``ca.crt``) and a SuperLink certificate for ``hosts`` (``server.pem``, key
    ``server.key``, mode 600) in ``directory``."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("medsec federation CA", ca_key.public_key(), None, ca_key, days,
                      [(x509.BasicConstraints(ca=True, path_length=0), True)])
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = _certificate(hosts[0], key.public_key(), ca.subject, ca_key, days,
                        [(x509.BasicConstraints(ca=False, path_length=None), True),
                         (x509.SubjectAlternativeName(names), False)])
    pem = serialization.Encoding.PEM
    return Certificates(
        ca=_write(directory / "ca.crt", ca.public_bytes(pem)),
        cert=_write(directory / "server.pem", cert.public_bytes(pem)),
        key=_write(directory / "server.key", key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                               serialization.NoEncryption()), private=True))


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format: ``<name>`` (mode 600, stays on the site)
    and ``<name>.pub`` (registered with the SuperLink)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(directory / name, private, private=True), _write(directory / f"{name}.pub", public)


# ---- the apps Flower loads (flower_app/pyproject.toml) --------------------------------------------
def load_config(path: str, where: str) -> DictConfig:
    """The resolved medsec config at ``path`` (``where``: the setting that named it)."""
    if not path or not Path(path).expanduser().is_file():
        raise ConfigError(f"{where}: '{path}' is not a medsec config file")
    return OmegaConf.load(Path(path).expanduser())


server = ServerApp()
"""medsec's ServerApp: the federation's server (:func:`medsec.federated.federation.prepare`) trains
the remaining rounds through the SuperLink's grid and writes ``federated.json``."""


@server.main()
def _serve(grid: Grid, context: Context) -> None:
    from medsec.federated.federation import conclude, prepare

    federation = prepare(load_config(str(context.run_config.get(CONFIG_KEY, "")), f"run config {CONFIG_KEY}"))
    if federation.remaining > 0:
        federation.app()(grid, context)
    conclude(federation)


class SiteApp(ClientApp):
    """medsec's ClientApp for one SuperNode: the site's config is the file its ``--node-config``
    names (``medsec-config``), its index ``partition-id``; then the simulation's ClientApp."""

    def __call__(self, message: Message, context: Context) -> Message:
        if PARTITION_ID not in context.node_config:
            raise ConfigError(f"SuperNode --node-config needs {PARTITION_ID}=<site index>")
        cfg = load_config(str(context.node_config.get(CONFIG_KEY, "")), f"SuperNode --node-config {CONFIG_KEY}")
        return client_app(OmegaConf.to_container(cfg), client_mods(cfg))(message, context)


site = SiteApp()


# ---- running it on loopback ----------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, seconds: float, what: str) -> None:
    """Wait until ``process`` listens on ``port`` (``RuntimeError`` naming ``what`` if it exits or times out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds:.0f} s")


def wait_for_log(path: Path, text: str, process: subprocess.Popen, seconds: float, what: str) -> None:
    """Wait until ``process``'s log ``path`` shows ``text`` (``RuntimeError`` naming ``what`` and the
    log if it exits or times out)."""
    deadline = time.monotonic() + seconds
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with code {process.returncode}" if process.returncode is not None else "timed out"
            raise RuntimeError(f"{what} {state} before connecting; see {path}:\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def flower_environment(home: Path) -> dict[str, str]:
    """This environment with ``FLWR_HOME=home`` and this interpreter's scripts first on ``PATH``
    (the SuperLink and SuperNodes start ``flwr-serverapp``/``flwr-clientapp`` by name)."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0"}


def flower_command(name: str) -> str:
    """The path of Flower's CLI ``name`` next to this interpreter (else on ``PATH``)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise ConfigError(f"federation.backend=deployment needs Flower's '{name}' command, which is not installed")
    return found


def write_connection(home: Path, address: str, root_certificates: Path) -> None:
    """The ``flwr`` CLI's config in ``home``: one SuperLink connection, :data:`CONNECTION`."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "{address}"\nroot-certificates = "{root_certificates}"\n')


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux ``/proc``; none elsewhere), including those that Flower
    detaches into their own sessions (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _signal(pid: int, signum: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signum)


class Processes:
    """Child processes, each in its own process group, stopped on exit with everything they started
    (SIGTERM, then SIGKILL after :data:`STOP_SECONDS`)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start ``command`` with its output in ``<logs>/<name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        self.started.append(process)
        return process

    def stop(self) -> None:
        """Stop every process started and its descendants, newest first."""
        below = [child for process in self.started for child in descendants(process.pid)]
        for process in reversed(self.started):
            _signal(process.pid, signal.SIGTERM, group=True)
        for child in below:
            _signal(child, signal.SIGTERM, group=False)
        deadline = time.monotonic() + STOP_SECONDS
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.1))
            _signal(process.pid, signal.SIGKILL, group=True)
            process.wait()
        for child in below:
            _signal(child, signal.SIGKILL, group=False)


@contextlib.contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    """:class:`Processes` stopped when the block ends, however it ends."""
    started = Processes(logs)
    try:
        yield started
    finally:
        started.stop()


def run_flwr(args: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    """``flwr ARGS``'s output (``RuntimeError`` naming ``what`` if it fails)."""
    try:
        done = subprocess.run([flower_command("flwr"), *args], env=env, capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{what}: flwr {args[0]} did not finish within {timeout:.0f} s") from err
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (flwr {args[0]}, exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def run_status(run_id: str, env: dict[str, str]) -> dict[str, Any]:
    """``flwr ls --run-id``'s entry for the run (``status`` e.g. ``finished:completed``)."""
    listing = run_flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], env, 60, f"reading run {run_id}")
    return json.loads(listing)["runs"][0]


def submit(config: Path, home: Path, timeout: float) -> None:
    """``flwr run`` medsec's Flower App with ``config`` on the SuperLink of ``home``'s connection and
    wait for it to end (its log in ``home/run.log``); ``RuntimeError`` unless it completed."""
    env, deadline = flower_environment(home), time.monotonic() + timeout
    output = run_flwr(["run", str(APP_DIR), CONNECTION, "--run-config", f'{CONFIG_KEY}="{config}"', "--stream"],
                      env, timeout, "the federated run")
    (home / "run.log").write_text(output)
    started = re.search(r"Successfully started run (\d+)", output)
    if started is None:
        raise RuntimeError(f"flwr run did not start the run:\n{output}")
    while not (status := run_status(started[1], env))["status"].startswith("finished") and time.monotonic() < deadline:
        time.sleep(1)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"federated run {started[1]}: {status['status']} {status['status-details']} "
                           f"(see {home / 'run.log'} and the SuperLink's and SuperNodes' logs)")


def supernode_command(superlink: str, ca: Path, key: Path | None, site: int, config: Path,
                      runtime_port: int) -> list[str]:
    """``flower-supernode`` for site ``site``: TLS to ``superlink`` trusting ``ca``, signing with ``key``."""
    command = [flower_command("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
               "--node-config", f'{PARTITION_ID}={site} {CONFIG_KEY}="{config}"', "--port", str(runtime_port),
               "--max-retries", "0"]
    return [*command, "--auth-supernode-private-key", str(key)] if key else command


def deploy(cfg: DictConfig) -> dict[str, Any]:
    """Run the federation ``cfg`` (checked and resolved) with Flower's deployment runtime; returns
    the ``federated.json`` that the ServerApp wrote."""
    dep = cfg.federation.get("deployment")
    if dep is None:
        raise ConfigError("federation.backend=deployment needs federation.deployment (conf/federation/deployment.yaml)")
    protects = [cfg.get("protect") or {}, *((entry.get("protect") or {}) for entry in cfg.federation.get("sites") or [])]
    if any("dp" in protect for protect in protects):
        raise ConfigError("federation.backend=deployment with protect=[dp]: Flower starts a new ClientApp process "
                          "for every message, so a site's DP-SGD accountant would restart every round and "
                          "under-report epsilon; use the simulation runtime (federation.backend=ray|inprocess)")
    out = Path(cfg.paths.output_dir)
    work = out / "deployment"
    config = work / "federation.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config)
    timeout = float(dep.timeout)
    if dep.get("superlink"):
        if not dep.get("root_certificates"):
            raise ConfigError("federation.deployment.superlink needs federation.deployment.root_certificates "
                              "(the CA certificate the SuperLink's certificate is signed with)")
        write_connection(work / "flwr" / "cli", str(dep.superlink), Path(dep.root_certificates).expanduser().resolve())
        submit(config, work / "flwr" / "cli", timeout)
    else:
        run_on_loopback(cfg, work, config, timeout)
    return json.loads((out / "federated.json").read_text())


def run_on_loopback(cfg: DictConfig, work: Path, config: Path, timeout: float) -> None:
    """A SuperLink and one SuperNode per site on 127.0.0.1 (TLS; node authentication when
    ``federation.deployment.node_auth``), the run submitted, everything stopped after it."""
    tls = make_certificates(work / "tls")
    port = free_port()
    address = f"127.0.0.1:{port}"
    cli_home = work / "flwr" / "cli"
    write_connection(cli_home, address, tls.ca)
    node_auth = bool(cfg.federation.deployment.node_auth)
    with processes(work / "logs") as started:
        link = started.start("superlink", [
            flower_command("flower-superlink"), "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
            "--ssl-keyfile", str(tls.key), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation", *(["--enable-supernode-auth"] if node_auth else [])],
            flower_environment(work / "flwr" / "superlink"))
        wait_for_port(port, link, 60, "flower-superlink")
        for index in range(num_sites(cfg)):
            key = None
            if node_auth:
                key, public = make_node_key(work / "keys", f"site{index}")
                run_flwr(["supernode", "register", str(public), CONNECTION], flower_environment(cli_home), 60,
                         f"registering site {index}'s key")
            node = started.start(f"supernode{index}", supernode_command(address, tls.ca, key, index, config,
                                                                        free_port()),
                                 flower_environment(work / "flwr" / f"site{index}"))
            wait_for_log(started.logs / f"supernode{index}.log", "SuperNode ID", node, 60, f"site {index}'s SuperNode")
        log.info("deployment: SuperLink on %s, %d SuperNodes (TLS%s); logs in %s", address, num_sites(cfg),
                 ", node authentication" if node_auth else "", work / "logs")
        submit(config, cli_home, timeout)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m medsec.federated.deployment certificates DIR --hosts H ...`` or ``node-key DIR NAME``."""
    parser = argparse.ArgumentParser(prog="python -m medsec.federated.deployment", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    certificates = commands.add_parser("certificates", help="a CA and the SuperLink's certificate for HOSTS")
    certificates.add_argument("directory", type=Path)
    certificates.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"])
    node_key = commands.add_parser("node-key", help="a SuperNode's key pair: NAME and NAME.pub")
    node_key.add_argument("directory", type=Path)
    node_key.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "certificates":
        print(make_certificates(args.directory, args.hosts))
    else:
        print(*make_node_key(args.directory, args.name))


if __name__ == "__main__":
    main()
