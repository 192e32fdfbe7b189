"""A shared server nobody else can drive (docs/operations.md section 1, docs/reliability.md threat model).

Against a real ``prefect server start`` on loopback with basic authentication (one per module): without
credentials the API refuses and the hub token's Secret block is unreadable; with them the CLI deploys, a process
worker runs a deployment that reads the token, and the token appears in no log, parameter, job variable or
artifact; every path rule of a deployment run refuses a run that breaks it before any task starts. The shared-server
command (``make server`` / ``scripts/prefect_server.py``) refuses a non-loopback address without an auth string.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import yaml
from prefect.client.orchestration import get_client

from icm_core.infra.confinement import REGISTRIES_ENV, ROOTS_ENV
from tests.flows.support import forecast_text, recipe_text, settled_task_runs, tiny_run_config, write_categories
from tests.live_server import PREFECT, REPO, serving
from tests.ops.support import wait_for_run


pytestmark = pytest.mark.timeout(900)

AUTH = f"admin:{secrets.token_hex(16)}"
TOKEN = f"hf_{secrets.token_hex(20)}"  # the hub token: a fresh random value, so any match is a leak
BLOCK = "hf-token"  # the block name prefect.yaml's gpu-pool gives the runs (ICM_HF_TOKEN_BLOCK)
SCRIPT = REPO / "scripts" / "prefect_server.py"


def server_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prefect_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(url: str, body: dict | None = None, auth: str | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET (no body) or a JSON POST, with basic authentication when ``auth`` is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- the shared-server command -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
@pytest.mark.parametrize("auth", [None, ""], ids=["unset", "empty"])
def test_server_command_refuses_a_non_loopback_address_without_auth(host, auth, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if auth is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--host", host, "--port", "4391", "--timeout", "5"],
        cwd=tmp_path,  # not the checkout: its prefect.toml / .env play no part
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"refusing to listen on {host} without authentication") and (
        "PREFECT_SERVER_API_AUTH_STRING=" in line and "PREFECT_API_AUTH_STRING" in line
    ), line
    assert not (tmp_path / "home" / "server.pid").exists() and not (tmp_path / "home" / "server.log").exists()


def test_loopback_and_auth_checks_of_the_server_command():
    from prefect.settings import PREFECT_SERVER_API_AUTH_STRING, temporary_settings

    script = server_script()
    for host in ("127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost"):
        assert script.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.1", "no-such-host.invalid"):
        assert not script.is_loopback(host), host
    with temporary_settings({PREFECT_SERVER_API_AUTH_STRING: AUTH}):
        assert script.auth_configured()
    with temporary_settings({PREFECT_SERVER_API_AUTH_STRING: None}):
        assert not script.auth_configured()


# --- a server with authentication ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory):
    with serving(tmp_path_factory.mktemp("prefect-auth"), auth=AUTH) as server:
        from prefect.blocks.system import Secret

        with server.connected():
            Secret(value=TOKEN).save(BLOCK, overwrite=True)
        yield server


@pytest.mark.slow
def test_without_credentials_the_api_refuses_and_the_secret_is_unreadable(auth_server):
    api = auth_server.api_url
    query = {"include_secrets": True}
    status, body = request(f"{api}/block_documents/filter", query)
    assert (status, json.loads(body)) == (401, {"exception_message": "Unauthorized"})
    assert request(f"{api}/block_documents/filter", query, auth="admin:wrong")[0] == 401
    for path in ("deployments/filter", "flow_runs/filter", "work_pools/filter", "artifacts/filter", "logs/filter"):
        assert request(f"{api}/{path}", {})[0] == 401, path
    assert request(f"{api}/health")[0] == 200  # the health probe stays open (prefect 3.8.8), nothing else
    # With credentials the same request returns the block: the refusal above is the only thing protecting it.
    status, body = request(f"{api}/block_documents/filter", query, auth=AUTH)
    assert status == 200 and TOKEN in body

    # The UI: its pages are static files; it learns that the server wants a login, and its API refuses without one.
    status, body = request(f"{auth_server.url}/ui-settings")
    settings = json.loads(body)
    assert status == 200 and settings["auth"] == "BASIC" and settings["api_url"] == api

    # A client without the auth string: the Python API and the CLI are refused.
    from prefect.blocks.system import Secret

    with replace(auth_server, auth=None, processes=[]).connected():
        with pytest.raises(Exception, match="401"):
            Secret.load(BLOCK)
    anonymous = auth_server.env()
    del anonymous["PREFECT_API_AUTH_STRING"]
    done = subprocess.run([PREFECT, "block", "ls"], cwd=REPO, env=anonymous, capture_output=True, text=True)
    assert done.returncode != 0 and TOKEN not in done.stdout + done.stderr
    with auth_server.connected():
        assert Secret.load(BLOCK).get() == TOKEN


def deploy(server, tmp_path: Path, config: dict, registry: Path, root: Path) -> None:
    """The repository's pipeline (gpu), generate and registry-scan deployments on one pool, with this test's tiny
    config and folders; the gpu pool's job variables (ICM_HF_TOKEN_BLOCK: hf-token) kept, but offline."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    chosen = {d["name"]: d for d in spec["deployments"] if d["name"] in ("gpu", "generate", "registry")}
    chosen["gpu"]["parameters"] = {"config": config, "categories_file": str(registry), "root": str(root)}
    chosen["generate"]["parameters"] = {"root": str(root)}
    chosen["registry"]["parameters"] = {"registry": str(registry), "root": str(root)}
    chosen["registry"].pop("schedules")
    for deployment in chosen.values():
        deployment["work_pool"] = {**deployment["work_pool"], "name": "gpu-pool"}
    env = chosen["gpu"]["work_pool"]["job_variables"]["env"]
    assert env["ICM_HF_TOKEN_BLOCK"] == BLOCK
    env["HF_HUB_OFFLINE"] = "1"  # the tiny model is a local folder; nothing is downloaded here
    spec["deployments"] = list(chosen.values())
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    server.cli("work-pool", "create", "gpu-pool", "--type", "process", "--overwrite")
    server.cli("deploy", "--prefect-file", str(prefect_file), "--all", "--no-prompt", timeout=300)


@pytest.fixture(scope="module")
def deployed(auth_server, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The deployments and a process worker that confines runs to this module's root and registry."""
    tmp = tmp_path_factory.mktemp("deployed")
    registry, root, outside = tmp / "registry", tmp / "artifacts", tmp / "outside"
    write_categories(registry, {"recipes": recipe_text(), "forecast": forecast_text()})
    outside_file = write_categories(outside / "data", {"recipes": recipe_text(), "forecast": forecast_text()})
    config = tiny_run_config(tiny_base_dir).model_dump(mode="json")
    deploy(auth_server, tmp, config, registry, root)
    worker_log = tmp / "worker.log"
    auth_server.spawn(
        [PREFECT, "worker", "start", "--pool", "gpu-pool", "--type", "process", "--limit", "2"],
        worker_log,
        PREFECT_WORKER_QUERY_SECONDS="1",
        **{ROOTS_ENV: str(root), REGISTRIES_ENV: str(registry)},
    )
    with auth_server.connected(), get_client(sync_client=True) as client:
        ids = {
            name: client.read_deployment_by_name(name).id
            for name in ("icm-pipeline/gpu", "generate-adapter/generate", "scan-categories/registry")
        }
    return SimpleNamespace(
        registry=registry,
        root=root,
        outside=outside,
        outside_file=outside_file,
        ids=ids,
        log=worker_log,
        config=config,
    )


@pytest.mark.slow
def test_a_deployment_run_completes_and_the_token_leaks_nowhere(auth_server, deployed):
    # The CLI reads PREFECT_API_AUTH_STRING from its environment (the server's env() sets it).
    auth_server.cli("deployment", "run", "icm-pipeline/gpu", "--param", 'only=["recipes", "forecast"]')
    with auth_server.connected():
        run = wait_for_run(deployed.ids["icm-pipeline/gpu"], {"only": ["recipes", "forecast"]}, timeout=600)
        assert run.state.is_completed(), f"{run.state}: see {deployed.log}"
        seen = everything_the_api_holds()
    assert f"HF_TOKEN set for this run from the Secret block '{BLOCK}'" in seen["logs"]  # the run did read it
    # The search sees the run: its parameters, its log lines and its artifacts.
    assert str(deployed.root) in seen["flow runs"] and f"artifacts under {deployed.root}" in seen["logs"]
    assert "icm-eval-summary" in seen["artifacts"] and "recipes" in seen["artifacts"]
    files = [auth_server.log, deployed.log, *(p for p in deployed.root.rglob("*") if p.is_file())]
    seen["files"] = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)
    assert {where: TOKEN in text for where, text in seen.items()} == dict.fromkeys(seen, False)


def everything_the_api_holds() -> dict[str, str]:
    """The server's logs, flow runs (parameters, job variables, state messages), deployments and artifacts as
    text, by kind."""
    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while batch := client.read_logs(offset=offset, limit=200):
            logs += batch
            offset += len(batch)
        flow_runs = client.read_flow_runs(limit=200)
        deployments = client.read_deployments()
        artifacts = client.read_artifacts(limit=200)
    dump = lambda items: "\n".join(item.model_dump_json() for item in items)  # noqa: E731
    return {
        "logs": dump(logs),
        "flow runs": dump(flow_runs),
        "deployments": dump(deployments),
        "artifacts": dump(artifacts),
    }


def remote_code(d: SimpleNamespace) -> dict:
    config = json.loads(json.dumps(d.config))
    config["model"]["trust_remote_code"] = True
    return {"config": config}


OUTSIDE = "is outside the places allowed for a deployment run"
REFUSED = {  # rule: (deployment, its run's parameters, the start of the refusal message)
    "root": ("icm-pipeline/gpu", lambda d: {"root": str(d.outside / "root")}, lambda d: f"root: '{d.outside}/root'"),
    "root-url": ("icm-pipeline/gpu", lambda d: {"root": "memory://elsewhere/icm"}, lambda d: "root: 'memory://"),
    "categories_file": (
        "icm-pipeline/gpu",
        lambda d: {"categories_file": str(d.outside_file)},
        lambda d: f"categories_file: '{d.outside_file}'",
    ),
    "out": (
        "generate-adapter/generate",
        lambda d: {"category": "recipes", "out": str(d.outside / "adapter")},
        lambda d: f"out: '{d.outside}/adapter'",
    ),
    "registry": (
        "scan-categories/registry",
        lambda d: {"registry": str(d.outside / "data")},
        lambda d: f"registry: '{d.outside}/data'",
    ),
    "trust_remote_code": ("icm-pipeline/gpu", remote_code, lambda d: "config.model.trust_remote_code: "),
}


@pytest.mark.slow
def test_each_rule_refuses_a_deployment_run_before_any_task(auth_server, deployed):
    from prefect.deployments import run_deployment

    with auth_server.connected():
        runs = {
            rule: run_deployment(name, parameters=params(deployed), timeout=0)
            for rule, (name, params, _) in REFUSED.items()
        }
        for rule, submitted in runs.items():
            name, params, start = REFUSED[rule]
            run = wait_for_run(deployed.ids[name], params(deployed), timeout=300)
            assert run.id == submitted.id
            assert run.state.is_failed(), f"{rule}: {run.state}: see {deployed.log}"
            message = run.state.message or ""
            assert f"ConfinementError: {start(deployed)}" in message, message
            if rule == "trust_remote_code":
                assert "ICM_ALLOW_REMOTE_CODE=1" in message, message
            else:
                allowed = deployed.registry if rule in ("categories_file", "registry") else deployed.root
                assert OUTSIDE in message and message.endswith(f": {allowed}"), message
        assert settled_task_runs([run.id for run in runs.values()]) == []  # no task started
    assert not deployed.outside.joinpath("root").exists() and not deployed.outside.joinpath("adapter").exists()
