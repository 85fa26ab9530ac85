"""The files under deploy/ (systemd unit, Kubernetes DaemonSet, containerd mirror configuration, the HAProxy
configuration and compose file for several registry instances) parse, carry the fields a kubelet, systemd,
containerd, HAProxy and docker-compose need, and agree with each other: the address the agent listens on is
the mirror containerd asks and the address the probes check, the cache directory is the hostPath, the registry
the agent asks is the one the mirror stands in for; HAProxy's servers are the instances' ports, and the instances
share one database and one blob directory. Nothing here starts a process but `systemd-analyze verify` and
`haproxy -c` (tests/e2e/test_ha.py runs the HAProxy configuration in front of real instances).

No cluster, systemd or containerd daemon is available to the suite, so this is what can be checked without them;
the agent itself behind dockerd and containerd is tested end to end elsewhere (tests/e2e).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.tools import need

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "docket-agent.service"
ENV_EXAMPLE = DEPLOY / "agent.env"
DAEMONSET = DEPLOY / "kubernetes" / "docket-agent-daemonset.yaml"
CERTS_D = DEPLOY / "containerd" / "certs.d"
CONFIG_PATH = "/etc/containerd/certs.d"  # where deploy/README.md installs certs.d/
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
COMPOSE_HA = DEPLOY / "docker-compose.ha.yml"


# --- helpers -------------------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def option(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an argument list (click accepts both)."""
    for i, arg in enumerate(argv):
        if arg == name:
            assert i + 1 < len(argv), f"{name} has no value in {argv}"
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def subcommand(argv: list[str]) -> str:
    """The `docket` subcommand of an argument list: the first word after the program that is not an option or
    the value of a global option (-h/-p/-l/--token/... take one)."""
    takes_value = {"-h", "--host", "-p", "--port", "-l", "--location", "--token", "--token-file", "--ca-bundle",
                   "--timeout"}
    assert Path(argv[0]).name == "docket", argv
    words = iter(argv[1:])
    for word in words:
        if word in takes_value:
            next(words, None)
        elif not word.startswith("-"):
            return word
    raise AssertionError(f"no subcommand in {argv}")


def hosts_tomls() -> list[Path]:
    return sorted(CERTS_D.glob("*/hosts.toml"))


def the_hosts_toml() -> tuple[str, dict[str, Any]]:
    """(registry host:port the directory is named after, the parsed hosts.toml)."""
    files = hosts_tomls()
    assert len(files) == 1, f"expected one certs.d/<host:port>/hosts.toml, found {files}"
    return files[0].parent.name, tomllib.loads(files[0].read_text())


def mirror_url(hosts: dict[str, Any]) -> str:
    """The one [host."..."] of a hosts.toml: the agent."""
    table = hosts.get("host")
    assert isinstance(table, dict) and len(table) == 1, f"expected one [host.\"...\"] table, got {table!r}"
    return next(iter(table))


def unit_parser(text: str) -> configparser.RawConfigParser:
    # systemd allows repeated keys (Environment=); strict=False keeps the last, which is fine for single keys.
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def unit_environment(text: str) -> dict[str, str]:
    """Every Environment=KEY=VALUE of the unit's [Service] (a repeated key configparser would merge)."""
    env: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line.startswith("Environment="):
            for assignment in shlex.split(line.split("=", 1)[1]):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of an EnvironmentFile (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=value: {line!r}"
            env[key] = value
    return env


def agent_container() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(pod spec, the agent's container, its full argv)."""
    ds = the(yaml_docs(DAEMONSET), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c.get("name") == "agent"]
    assert len(containers) == 1, pod["containers"]
    container = containers[0]
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    return pod, container, argv


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"probe port {port!r} names no container port ({named})"
    return int(named[port])


# --- every YAML file ---------------------------------------------------------------------------------------


def test_every_yaml_under_deploy_parses_into_named_kubernetes_objects() -> None:
    files = [p for p in sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml")) if p != COMPOSE_HA]
    assert DAEMONSET in files
    for path in files:
        docs = yaml_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], f"{path}: no apiVersion"
            assert isinstance(doc.get("kind"), str) and doc["kind"], f"{path}: no kind"
            name = doc.get("metadata", {}).get("name")
            # A DNS-1123 label: what Namespace, ConfigMap and DaemonSet names must be.
            assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), (path, name)


# --- the DaemonSet -----------------------------------------------------------------------------------------


def test_daemonset_is_a_valid_apps_v1_daemonset_running_docket_agent_on_every_node() -> None:
    docs = yaml_docs(DAEMONSET)
    ds = the(docs, "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    assert ds["metadata"]["name"] == "docket-agent"
    namespace = the(docs, "Namespace")
    assert ds["metadata"]["namespace"] == namespace["metadata"]["name"]
    # hostNetwork and hostPath are outside the baseline Pod Security profile: the namespace must allow them.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"

    selector = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector, "an empty selector"
    assert selector.items() <= labels.items(), f"selector {selector} does not select the template's {labels}"

    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    # Two agents on a node would want the same host port: no surge.
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert strategy["rollingUpdate"]["maxUnavailable"] >= 1

    pod, container, argv = agent_container()
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # On every node: one toleration with operator Exists and no key tolerates every taint.
    assert any(t.get("operator") == "Exists" and "key" not in t and "effect" not in t for t in pod["tolerations"])
    assert isinstance(container["image"], str) and container["image"]
    assert subcommand(argv) == "agent"
    assert container["resources"]["limits"]["memory"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_daemonset_cache_dir_is_a_hostpath_volume_mounted_at_the_same_path() -> None:
    pod, container, argv = agent_container()
    cache_dir = option(argv, "--cache-dir")
    assert cache_dir == "/var/cache/docket"
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    assert len(mounts) == 1, f"nothing mounted at --cache-dir {cache_dir}: {container['volumeMounts']}"
    assert not mounts[0].get("readOnly", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    volume = volumes[mounts[0]["name"]]
    assert volume["hostPath"]["path"] == cache_dir
    assert volume["hostPath"]["type"] in {"DirectoryOrCreate", "Directory"}


def test_daemonset_listens_on_the_mirror_address_and_probes_check_it() -> None:
    _, container, argv = agent_container()
    listen = option(argv, "--listen")
    host, _, port = listen.rpartition(":")
    # The mirror containerd asks on this node is the address the agent listens on.
    _, hosts = the_hosts_toml()
    mirror = urlsplit(mirror_url(hosts))
    assert (mirror.hostname, mirror.port) == (host, int(port))
    # Loopback only: the agent serves the registry's images to whoever connects.
    assert host.startswith("127.")
    assert [p["containerPort"] for p in container["ports"]] == [int(port)]

    probes = {name: container[name] for name in ("startupProbe", "livenessProbe", "readinessProbe") if name in container}
    assert {"livenessProbe", "readinessProbe"} <= probes.keys()
    for name, probe in probes.items():
        get = probe["httpGet"]
        # hostNetwork: without `host` the kubelet would probe the node's address, where nothing listens.
        assert get["host"] == host, name
        assert port_number(container, get["port"]) == int(port), name
        assert get["path"].startswith("/"), name
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/"


def test_daemonset_asks_the_registry_the_mirror_stands_in_for() -> None:
    docs = yaml_docs(DAEMONSET)
    _, container, _ = agent_container()
    env = {e["name"]: e for e in container["env"]}
    ref = env["DOCKET_HOST"]["valueFrom"]["configMapKeyRef"]
    configmap = the(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == ref["name"]
    assert configmap["metadata"]["namespace"] == the(docs, "DaemonSet")["metadata"]["namespace"]
    registry = urlsplit(configmap["data"][ref["key"]])
    name, hosts = the_hosts_toml()
    assert registry.netloc == name
    assert registry.scheme == urlsplit(hosts["server"]).scheme
    # The node's address for the peer wire (hostNetwork: the pod's IP is the node's).
    assert env["DOCKET_PEER_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_dockerfile_image_has_the_docket_cli_and_ctorrent() -> None:
    """The DaemonSet runs `docket agent` in the image the Dockerfile builds: it must install both."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\bctorrent\b", dockerfile)
    assert re.search(r"pip install[^\n]* \.", dockerfile)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["docket"] == "docket.client.cli:main"
    _, _, argv = agent_container()
    assert argv[0] == "docket"


# --- containerd --------------------------------------------------------------------------------------------


def test_hosts_toml_names_the_agent_as_a_pull_only_mirror_of_its_directory_registry() -> None:
    name, hosts = the_hosts_toml()
    server = urlsplit(hosts["server"])
    assert server.scheme in {"http", "https"}, "without a scheme containerd assumes https"
    assert server.netloc == name, "the directory must be named after the registry the server line names"
    assert server.path in {"", "/"}
    mirror = mirror_url(hosts)
    url = urlsplit(mirror)
    assert url.scheme == "http" and url.hostname == "127.0.0.1" and url.port == 5000
    assert hosts["host"][mirror]["capabilities"] == ["pull", "resolve"]


def toml_blocks(markdown: Path) -> list[dict[str, Any]]:
    return [tomllib.loads(block) for block in re.findall(r"```toml\n(.*?)```", markdown.read_text(), re.S)]


@pytest.mark.parametrize("markdown", [DEPLOY / "README.md", ROOT / "README.md"], ids=["deploy", "top"])
def test_readme_containerd_files_parse_and_match_deploy(markdown: Path) -> None:
    """The hosts.toml and config.toml the READMEs tell users to write are valid and say what deploy/ says."""
    blocks = toml_blocks(markdown)
    mirrors = [b for b in blocks if "server" in b]
    configs = [b for b in blocks if "plugins" in b]
    assert mirrors and configs, f"{markdown}: a hosts.toml and a config.toml block expected"
    _, example = the_hosts_toml()
    for hosts in mirrors:
        assert urlsplit(hosts["server"]).scheme == "http"
        assert hosts["host"] == example["host"]
    for config in configs:
        assert config["version"] == 2
        assert config["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == CONFIG_PATH
    assert f"{CONFIG_PATH}/" in markdown.read_text()


# --- systemd -----------------------------------------------------------------------------------------------


def test_systemd_unit_runs_docket_agent_with_the_cache_directory_and_restarts() -> None:
    text = UNIT.read_text()
    unit = unit_parser(text)
    service = unit["Service"]
    assert service["Type"] == "simple"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/usr/local/bin/docket"
    assert subcommand(argv) == "agent"
    assert option(argv, "--cache-dir") == "/var/cache/" + service["CacheDirectory"] == "/var/cache/docket"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "control-group"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["EnvironmentFile"] == "/etc/docket/agent.env"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # Its listen address (the default DOCKET_AGENT_LISTEN; --listen would override it) is the mirror's.
    assert "--listen" not in argv
    host, _, port = unit_environment(text)["DOCKET_AGENT_LISTEN"].rpartition(":")
    mirror = urlsplit(mirror_url(the_hosts_toml()[1]))
    assert (mirror.hostname, mirror.port) == (host, int(port))
    # Sandboxed, but able to run ctorrent (no NoExecPaths/ExecPaths) and to write its cache.
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert "NoExecPaths" not in service and "ReadOnlyPaths" not in service


def test_systemd_env_example_names_the_registry_the_mirror_stands_in_for() -> None:
    env = env_file(ENV_EXAMPLE)
    name, hosts = the_hosts_toml()
    registry = urlsplit(env["DOCKET_HOST"])
    assert registry.netloc == name
    assert registry.scheme == urlsplit(hosts["server"]).scheme


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """systemd's own parser: no unknown key, no value it cannot parse (it warns on stderr and still exits 0)."""
    analyze = need("systemd-analyze")
    # verify also checks that ExecStart's program exists and is executable: point it at one that is.
    docket = Path(sys.executable).with_name("docket")
    program = docket if docket.exists() else Path(sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/docket", f"ExecStart={program}"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# --- several registry instances: HAProxy and the compose file ----------------------------------------------


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """``section name`` -> its lines (comments and blank lines dropped, whitespace collapsed)."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()  # no value in the file holds a "#"
        if not line:
            continue
        if not raw[:1].isspace():
            current = line
            sections[current] = []
        else:
            assert current is not None, raw
            sections[current].append(" ".join(line.split()))
    return sections


def haproxy_env_defaults(text: str) -> dict[str, str]:
    """``${NAME-default}`` references of the configuration: name -> default."""
    return dict(re.findall(r"\$\{([A-Z0-9_]+)-([^}]*)\}", text))


def test_haproxy_cfg_is_valid_with_its_defaults_and_with_addresses_given(tmp_path: Path) -> None:
    haproxy = need("haproxy")
    for env in ({}, {"DOCKET_HAPROXY_BIND": "127.0.0.1:18000", "DOCKET_REGISTRY_1": "10.0.0.1:8000",
                     "DOCKET_REGISTRY_2": "10.0.0.2:8000", "DOCKET_HAPROXY_STATS_SOCKET": str(tmp_path / "s")}):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DOCKET_")}
        result = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                                env={**clean, **env}, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[WARNING]" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_haproxy_cfg_balances_checks_healthz_and_fails_over() -> None:
    text = HAPROXY_CFG.read_text()
    sections = haproxy_sections(text)
    backend = sections["backend registries"]
    defaults = sections["defaults"]
    assert "balance roundrobin" in backend
    assert "option httpchk GET /healthz?scope=instance" in backend  # this instance's own checks only
    assert "http-check expect status 200" in backend
    servers = [line for line in backend if line.startswith("server ")]
    assert [s.split()[2] for s in servers] == ['"${DOCKET_REGISTRY_1-127.0.0.1:8001}"',
                                                '"${DOCKET_REGISTRY_2-127.0.0.1:8002}"']
    # Fast checks: a killed instance leaves the rotation within a few seconds.
    (default_server,) = [line for line in backend if line.startswith("default-server ")]
    words = default_server.split()
    value = {words[i]: words[i + 1] for i in range(1, len(words) - 1)}
    assert "check" in words
    interval = float(value["inter"].removesuffix("ms")) / 1000 if value["inter"].endswith("ms") \
        else float(value["inter"].removesuffix("s"))
    assert interval * int(value["fall"]) <= 3
    assert int(value["rise"]) >= 2
    # A refused connection goes to the other instance.
    assert any(re.fullmatch(r"retries [1-9]", line) for line in defaults)
    assert any(line.startswith("option redispatch") for line in defaults)
    # Streamed bodies: nothing buffers a request or caps its size; timeouts long enough for big blobs.
    lines = [line for body in sections.values() for line in body]
    assert not [line for line in lines if "http-buffer-request" in line or line.startswith(("http-request deny",
                                                                                          "tune.bufsize"))]
    timeouts = {line.split()[1]: line.split()[2] for line in defaults if line.startswith("timeout ")}
    seconds = {k: int(v[:-1]) * {"s": 1, "m": 60, "h": 3600}[v[-1]] for k, v in timeouts.items()}
    assert seconds["server"] >= 600 and seconds["client"] >= 60 and seconds["connect"] <= 5
    assert "mode http" in defaults


def test_compose_ha_runs_two_instances_on_one_database_and_location_behind_haproxy() -> None:
    doc = yaml.safe_load(COMPOSE_HA.read_text())
    services = doc["services"]
    assert {"postgres", "registry-1", "registry-2", "tracker", "haproxy"} <= services.keys()
    registries = [services["registry-1"], services["registry-2"]]
    envs = [r["environment"] for r in registries]
    # One database, one blob directory (the same volume at the same path), one external tracker.
    assert envs[0]["DOCKET_REGISTRY_DB"] == envs[1]["DOCKET_REGISTRY_DB"]
    assert envs[0]["DOCKET_REGISTRY_DB"].startswith("postgresql+psycopg://")
    assert envs[0]["DOCKET_REGISTRY_LOCATION"] == envs[1]["DOCKET_REGISTRY_LOCATION"]
    assert registries[0]["volumes"] == registries[1]["volumes"]
    assert any(v.endswith(":" + envs[0]["DOCKET_REGISTRY_LOCATION"]) for v in registries[0]["volumes"])
    assert envs[0]["DOCKET_TRACKER"] == envs[1]["DOCKET_TRACKER"]
    ports = [int(e["DOCKET_REGISTRY_PORT"]) for e in envs]
    assert len(set(ports)) == 2
    # HAProxy runs deploy/haproxy.cfg with the instances' addresses.
    haproxy = services["haproxy"]
    assert any(v.startswith("./haproxy.cfg:") for v in haproxy["volumes"])
    hp_env = haproxy["environment"]
    assert [hp_env["DOCKET_REGISTRY_1"], hp_env["DOCKET_REGISTRY_2"]] == [f"127.0.0.1:{p}" for p in ports]
    defaults = haproxy_env_defaults(HAPROXY_CFG.read_text())
    assert set(hp_env) <= defaults.keys(), "the compose file sets a variable haproxy.cfg does not read"
    assert [defaults["DOCKET_REGISTRY_1"], defaults["DOCKET_REGISTRY_2"]] == [f"127.0.0.1:{p}" for p in ports]
    # The tracker follows the whitelist through HAProxy, on the port the instances announce to.
    tracker = services["tracker"]["command"]
    assert tracker[0] == "docket-tracker"
    public_port = hp_env["DOCKET_HAPROXY_BIND"].removeprefix("*:")  # "${DOCKET_PUBLIC_PORT:-8000}" both places
    assert option(tracker, "--registry") == f"http://127.0.0.1:{public_port}"
    assert envs[0]["DOCKET_TRACKER"].endswith(":" + option(tracker, "--port"))
    # Host networking throughout: peers and the tracker see real addresses.
    assert all(s.get("network_mode") == "host" for s in services.values())


def test_compose_ha_is_accepted_by_docker_compose(tmp_path: Path) -> None:
    """`docker-compose config`: the file as docker-compose reads it (interpolation, anchors, depends_on)."""
    compose = need("docker-compose")
    env = {**os.environ, "DOCKET_DB_PASSWORD": "secret"}
    result = subprocess.run([compose, "-f", str(COMPOSE_HA), "config"], capture_output=True, text=True, env=env,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "postgresql+psycopg://docket:secret@" in result.stdout
    missing = subprocess.run([compose, "-f", str(COMPOSE_HA), "config"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "DOCKET_DB_PASSWORD"}, timeout=60,
                             stdin=subprocess.DEVNULL)
    assert missing.returncode != 0 and "DOCKET_DB_PASSWORD" in missing.stderr
