"""Deployment checks: the Dockerfile, the compose files, the Kubernetes manifests, the scripts the
images run, and a real Prometheus scraping a real `cllm4rec serve` with the repository's scrape
configuration.

There is no Docker engine in CI, so no image is built here: the Dockerfile is linted (hadolint),
its install steps are kept in step with the Makefile, and the script it installs runs as a plain
process. A check whose tool is missing skips and says how to get it; under CI (CI=true) it fails
instead, because `make test` installs every tool (Makefile: system-tools; the `test` extra).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from model.checkpoint import read_checkpoint
from service import metrics as service_metrics
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
TRAIN_CHECKPOINT = REPO / "docker" / "train-checkpoint.sh"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "cllm4rec.json"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("servicemonitor", "hpa-in-flight", "external-redis")
# The oldest Kubernetes release the manifests support and a current one (docs/deployment.md).
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
# Kinds from CRDs that kubernetes-validate has no schema for (it warns and passes them); they are
# checked structurally below instead.
CRD_KINDS = {"ServiceMonitor"}
# Every environment variable the server reads (service/settings.py): a typo in a deployment file
# would otherwise be ignored silently.
SETTINGS_ENV = {"CLLM4REC_" + name.upper() for name in Settings.model_fields}


def tool(name: str) -> str:
    """The path of a command-line tool: on the PATH or next to this Python (the venv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        reason = (f"{name} is not installed: `make system-tools` installs it (or pip install -e '.[test]' for "
                  "hadolint and kubernetes-validate)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def run(*command, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


COMPOSE_REDIS_PASSWORD = "compose-test-password-0123456789"


def clean_env(**extra) -> dict:
    """This process's environment without CLLM4REC_* settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLLM4REC_", "GRAFANA_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"docker/Dockerfile has no ARG {name}=..."
    return match.group(1)


# --- Dockerfile ----------------------------------------------------------------------------------

def test_hadolint_accepts_the_dockerfile():
    run(tool("hadolint"), "--failure-threshold", "info", DOCKERFILE)


def test_dockerfile_installs_the_torch_the_makefile_pins():
    makefile_pin = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert dockerfile_arg("TORCH_VERSION") == makefile_pin


def test_dockerfile_has_both_targets_a_non_root_user_and_a_readiness_healthcheck():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.MULTILINE)
    assert {"server", "trainer"} <= set(stages)
    assert stages[-1] == "server", "the default target (the last stage) should be the server"
    assert re.search(r"^USER \$\{APP_UID\}", text, re.MULTILINE) and int(dockerfile_arg("APP_UID")) > 0
    server = text[text.index("AS server"):]
    assert "HEALTHCHECK" in server and "/readyz" in server
    assert "OMP_WAIT_POLICY=PASSIVE" in text
    for variant in ("cpu)", "cuda)"):
        assert variant in text


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    """.dockerignore is an allow-list: a COPY of a path it does not re-include fails the build."""
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [part for part in line.split()[1:-1] if not part.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such path"
                assert any(source == a or source.startswith(a + "/") for a in allowed), \
                    f"COPY {source}, but .dockerignore keeps it out of the build context"


# --- train-checkpoint (the script the images run to write checkpoints) ---------------------------

def train_checkpoint(root: Path, *args) -> subprocess.CompletedProcess:
    return run("sh", TRAIN_CHECKPOINT, *args, check=False, env=clean_env(CLLM4REC_CHECKPOINTS_ROOT=str(root)))


def test_train_checkpoint_appears_complete_and_only_once(tmp_path, synthetic_data, tiny_llama):
    options = ["--backbone", tiny_llama, "--content-epochs", "0", "--pretrain-epochs", "1", "--finetune-epochs", "1",
               "--max-text-tokens", "8", "--val-users", "20"]
    # A leftover of a run interrupted before its first epoch ended: discarded, not resumed.
    (tmp_path / ".first.partial").mkdir()
    (tmp_path / ".first.partial" / "junk").write_text("x")
    first = train_checkpoint(tmp_path, "first", synthetic_data, *options)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"], "the partial directory must be renamed away"
    assert read_checkpoint(tmp_path / "first").meta["n_users"] > 0
    assert not (tmp_path / "first" / "junk").exists()

    again = train_checkpoint(tmp_path, "first", synthetic_data, *options)
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../up"])
def test_train_checkpoint_refuses_names_outside_the_root(tmp_path, name):
    result = train_checkpoint(tmp_path, name, "/nonexistent")
    assert result.returncode == 2 and "plain directory name" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_checkpoint_demo_is_the_quickstart_model_and_takes_no_options(tmp_path):
    result = train_checkpoint(tmp_path, "demo", "--demo", "--pretrain-epochs", "1")
    assert result.returncode == 2 and "takes no train options" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_checkpoint_demo_builds_the_quickstart_model_without_serving(tmp_path):
    """--demo runs `cllm4rec quickstart --no-serve` into the partial directory, then renames the
    checkpoint into place. (A stand-in `cllm4rec` records the call: the real one trains SmolLM2.)"""
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    root.mkdir()
    stand_in = bin_dir / "cllm4rec"
    stand_in.write_text('#!/bin/sh\necho "$@" > "$CALLS"\n'
                        'while [ "$#" -gt 0 ]; do [ "$1" = "--dir" ] && dir="$2"; shift; done\n'
                        'mkdir -p "$dir/checkpoint" && touch "$dir/checkpoint/checkpoint.json"\n')
    stand_in.chmod(0o755)
    env = clean_env(CLLM4REC_CHECKPOINTS_ROOT=str(root), CALLS=str(tmp_path / "calls"))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    run("sh", TRAIN_CHECKPOINT, "demo", "--demo", env=env)
    partial = root / ".demo.partial"
    assert (tmp_path / "calls").read_text().split() == ["quickstart", "--no-serve", "--dir", str(partial)]
    assert sorted(p.name for p in root.iterdir()) == ["demo"] and (root / "demo" / "checkpoint.json").exists()


def test_train_checkpoint_trains_one_checkpoint_from_two_pods_of_the_multi_node_job(tmp_path, synthetic_data,
                                                                                   tiny_llama):
    """The multi-node Job's two pods, as two processes on this machine sharing the checkpoints root:
    torchrun's c10d rendezvous joins them, pod 0 alone renames the finished checkpoint into place."""
    options = ["--backbone", tiny_llama, "--content-epochs", "0", "--pretrain-epochs", "0", "--finetune-epochs", "2",
               "--val-users", "20", "--batch-size", "16"]
    torchrun = (f"--nnodes 2 --nproc-per-node 1 --max-restarts 0 --rdzv-backend c10d --rdzv-id test "
                f"--rdzv-endpoint 127.0.0.1:{free_port()}")
    pods = [subprocess.Popen(["sh", str(TRAIN_CHECKPOINT), "multi", str(synthetic_data), *map(str, options)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=clean_env(CLLM4REC_CHECKPOINTS_ROOT=str(tmp_path), TORCHRUN_ARGS=torchrun,
                                           JOB_COMPLETION_INDEX=str(index), OMP_NUM_THREADS="1"))
            for index in (0, 1)]
    outputs = [pod.communicate(timeout=300)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # Rank 0 (progress, checkpoint) is on whichever pod joined the rendezvous first; pod 0 renames.
    assert sum("data parallel: 2 ranks (gloo)" in output for output in outputs) == 1
    assert "is ready" in outputs[0] and "is ready" not in outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi"]
    records = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 and read_checkpoint(tmp_path / "multi").meta["n_users"] > 0


def test_train_checkpoint_fails_when_training_fails(tmp_path):
    result = train_checkpoint(tmp_path, "broken", tmp_path / "no-such-dataset")
    assert result.returncode != 0
    assert not (tmp_path / "broken").exists(), "a failed run must not look like a checkpoint"


# --- docker compose ------------------------------------------------------------------------------

def compose_config(*files: str, profiles: tuple[str, ...] = (), **variables: str) -> dict:
    """The composed configuration, with these variables in the shell's environment."""
    command = [tool("docker-compose")]
    for f in files:
        command += ["-f", REPO / f]
    for p in profiles:
        command += ["--profile", p]
    env = clean_env(CLLM4REC_REDIS_PASSWORD=COMPOSE_REDIS_PASSWORD, **variables)
    return yaml.safe_load(run(*command, "config", cwd=REPO, env=env).stdout)


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes, short or long syntax."""
    result = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            result[parts[1]] = parts[0]
        else:
            result[volume["target"]] = volume["source"]
    return result


def read_only(service: dict, target: str) -> bool:
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.split(":")[1] == target:
            return volume.split(":")[2:] == ["ro"]
        if isinstance(volume, dict) and volume["target"] == target:
            return bool(volume.get("read_only"))
    raise AssertionError(f"nothing mounted at {target}")


def environment(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"([\d.]+)([hms])", duration))


@pytest.mark.parametrize("files,profiles", [
    (("docker-compose.yml",), ()),
    (("docker-compose.yml",), ("train",)),
    (("docker-compose.yml", "docker-compose.gpu.yml"), ()),
    (("docker-compose.yml", "docker-compose.gpu.yml"), ("train",)),
])
def test_docker_compose_config_accepts_the_files(files, profiles):
    command = [tool("docker-compose")] + [a for f in files for a in ("-f", REPO / f)]
    command += [a for p in profiles for a in ("--profile", p)]
    run(*command, "config", "-q", cwd=REPO, env=clean_env(CLLM4REC_REDIS_PASSWORD=COMPOSE_REDIS_PASSWORD))


def test_compose_refuses_to_start_redis_without_a_password():
    result = run(tool("docker-compose"), "-f", REPO / "docker-compose.yml", "config", "-q", cwd=REPO,
                 env=clean_env(), check=False)
    assert result.returncode != 0 and "CLLM4REC_REDIS_PASSWORD" in result.stderr


def test_compose_stack_is_wired_together():
    services = compose_config("docker-compose.yml")["services"]
    started_by_up = {name for name, service in services.items() if not service.get("profiles")}
    assert started_by_up == {"redis", "checkpoint-init", "api", "prometheus", "grafana"}
    assert services["train"]["profiles"] == ["train"], "train must only start with its profile"

    redis = services["redis"]
    server = redis["command"][-1]
    assert "--appendonly yes" in server and "--appendfsync everysec" in server
    assert '--requirepass "$$REDISCLI_AUTH"' in server  # $$: left for the container's shell to expand
    assert environment(redis)["REDISCLI_AUTH"] == COMPOSE_REDIS_PASSWORD  # also what the healthcheck's redis-cli uses
    assert not redis.get("ports"), "Redis is reachable on the stack's network only"
    assert mounts(redis)["/data"] == "redis-data"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]

    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["checkpoint-init"]["condition"] == "service_completed_successfully"
    assert api["build"]["target"] == "server" and (REPO / api["build"]["dockerfile"]).exists()
    env = environment(api)
    assert set(k for k in env if k.startswith("CLLM4REC_")) <= SETTINGS_ENV, "unknown CLLM4REC_ setting"
    assert env["CLLM4REC_REDIS_URL"] == f"redis://:{COMPOSE_REDIS_PASSWORD}@redis:6379/0"
    assert env["CLLM4REC_CHECKPOINT_ROOT"] == "/checkpoints"
    assert seconds(api["stop_grace_period"]) > float(env["CLLM4REC_SHUTDOWN_TIMEOUT_S"])
    assert mounts(api)["/checkpoints"] == "checkpoints" and read_only(api, "/checkpoints")
    assert api["read_only"] is True

    # checkpoint-init writes the checkpoint the API serves by default, into the same volume.
    init = services["checkpoint-init"]
    assert mounts(init)["/checkpoints"] == "checkpoints"
    assert env["CLLM4REC_CHECKPOINT"] == f"/checkpoints/{init['command'][0]}"
    assert init["entrypoint"][-1] == "train-checkpoint" and init["command"][1] == "--demo"

    # Prometheus scrapes the API at its compose address, with the repository's configuration.
    prometheus = services["prometheus"]
    assert Path(mounts(prometheus)["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    job = scrape_job(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))
    port = api["ports"][0]
    container_port = str(port["target"]) if isinstance(port, dict) else port.split(":")[-1].split("/")[0]
    assert job["static_configs"][0]["targets"] == [f"api:{container_port}"]

    grafana = services["grafana"]
    grafana_mounts = {target: Path(source) for target, source in mounts(grafana).items()}
    assert grafana_mounts["/etc/grafana/provisioning"] == REPO / "docker" / "grafana" / "provisioning"
    provider = yaml.safe_load((REPO / "docker/grafana/provisioning/dashboards/cllm4rec.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert grafana_mounts[dashboards_dir] == DASHBOARD.parent
    datasource = yaml.safe_load((REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert all(t["datasource"]["uid"] == datasource["datasources"][0]["uid"] for t in dashboard_targets())


def test_every_server_setting_of_the_compose_table_reaches_the_api():
    """docs/deployment.md's "Compose settings" table names what a shell or .env may set; each server setting
    in it must be passed on to the API's container."""
    section = (REPO / "docs" / "deployment.md").read_text().split("### Compose settings", 1)[1].split("\n#", 1)[0]
    # CLLM4REC_PORT there is the host's port, published to the container's 8000.
    documented = set(re.findall(r"^\| `(CLLM4REC_[A-Z0-9_]+)`", section, re.MULTILINE)) & SETTINGS_ENV - {"CLLM4REC_PORT"}
    assert {"CLLM4REC_DEVICE", "CLLM4REC_DTYPE", "CLLM4REC_BACKBONE_FORMAT"} <= documented
    values = {name: f"probe-{name.lower()}" for name in documented}
    api = environment(compose_config("docker-compose.yml", **values)["services"]["api"])
    assert {name: api.get(name) for name in documented} == values


def test_compose_train_profile_trains_the_mounted_dataset_into_the_volume():
    train = compose_config("docker-compose.yml", profiles=("train",))["services"]["train"]
    assert train["entrypoint"][-4:] == ["--", "train-checkpoint", "trained", "/data"]
    assert mounts(train)["/checkpoints"] == "checkpoints"
    assert Path(mounts(train)["/data"]) == REPO / "data"


def test_compose_gpu_override_reserves_a_gpu_and_builds_cuda_images():
    services = compose_config("docker-compose.yml", "docker-compose.gpu.yml", profiles=("train",))["services"]
    for name in ("api", "train", "checkpoint-init"):
        assert services[name]["build"]["args"]["VARIANT"] == "cuda"
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert environment(services["api"])["CLLM4REC_DEVICE"] == "cuda"


# --- Kubernetes ----------------------------------------------------------------------------------

def kustomize(directory: Path) -> list[dict]:
    out = run(tool("kubectl"), "kustomize", directory).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kubernetes_validate(docs: list[dict], tmp_path: Path) -> None:
    """kubernetes-validate --strict on the built manifests for each supported Kubernetes version;
    any error, or a warning other than 'no schema for a CRD kind', fails."""
    validator = tool("kubernetes-validate")
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    for version in KUBERNETES_VERSIONS:
        result = run(validator, "--strict", "-k", version, path, check=False)
        complaints = [line for line in (result.stdout + result.stderr).splitlines()
                      if line.startswith(("ERROR", "WARN"))
                      and not any(f"schema for kind {kind} " in line for kind in CRD_KINDS)]
        assert result.returncode == 0 and not complaints, f"Kubernetes {version}:\n" + "\n".join(complaints)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(REPO / "k8s" / "overlays" / request.param)


def test_overlay_builds_and_validates(overlay, tmp_path):
    name, docs = overlay
    kubernetes_validate(docs, tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "StatefulSet", "Job", "PersistentVolumeClaim"} <= kinds
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] != "Namespace")


def test_api_deployment_probes_drain_and_resources(overlay):
    name, docs = overlay
    deployment = one(docs, "Deployment", "cllm4rec-api")
    pod = deployment["spec"]["template"]["spec"]
    api = next(c for c in pod["containers"] if c["name"] == "api")
    port_names = {p["name"]: p["containerPort"] for p in api["ports"]}

    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup_budget = api["startupProbe"]["periodSeconds"] * api["startupProbe"]["failureThreshold"]
    assert startup_budget >= 120, "the startup probe must allow for a slow model load"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"

    settings = one(docs, "ConfigMap")
    assert api["envFrom"][0]["configMapRef"]["name"] == settings["metadata"]["name"]
    assert set(settings["data"]) <= SETTINGS_ENV, "unknown CLLM4REC_ setting in the ConfigMap"
    assert int(settings["data"]["CLLM4REC_PORT"]) == port_names["http"]
    prestop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = float(prestop[1]) + float(settings["data"]["CLLM4REC_SHUTDOWN_TIMEOUT_S"])
    # (The drain itself: tests/service/test_serve_batching.py::test_sigterm_drains_in_flight_requests.)
    assert pod["terminationGracePeriodSeconds"] > drain, "SIGKILL would cut the drain short"

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_arg("APP_UID"))
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    mounts_ = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert mounts_["/checkpoints"]["readOnly"] is True and "/tmp" in mounts_
    assert settings["data"]["CLLM4REC_CHECKPOINT"].startswith("/checkpoints/")
    assert pod["initContainers"][0]["name"] == "wait-for-checkpoint"
    # The API key comes from a Secret when there is one; without it the pods still start (no key).
    api_key = next(e for e in api["env"] if e["name"] == "CLLM4REC_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is True

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_names["http"]
    assert annotations["prometheus.io/path"] == "/metrics"

    resources = api["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert settings["data"]["CLLM4REC_DEVICE"] == "cuda"
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert settings["data"]["CLLM4REC_DEVICE"] == "cpu"
        assert int(settings["data"]["CLLM4REC_TORCH_THREADS"]) <= float(resources["limits"]["cpu"])


def test_service_hpa_and_pdb_point_at_the_api(overlay):
    _, docs = overlay
    deployment = one(docs, "Deployment", "cllm4rec-api")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    service = one(docs, "Service", "cllm4rec-api")
    assert selects(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in api["ports"]}
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cllm4rec-api"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # A drain never takes the only replica: at least one stays beside what the budget lets go.
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    least = min(hpa["spec"]["minReplicas"], deployment["spec"]["replicas"])
    assert ("maxUnavailable" in pdb and least - pdb["maxUnavailable"] >= 1) or pdb.get("minAvailable", 0) >= 1


def test_redis_statefulset_persists_and_the_api_points_at_it(overlay):
    _, docs = overlay
    redis = one(docs, "StatefulSet", "redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/data"} in container["volumeMounts"]
    assert container["args"][container["args"].index("--appendfsync") + 1] == "everysec"
    service = one(docs, "Service", "redis")
    assert redis["spec"]["serviceName"] == "redis"
    # a password from the Secret, required by Redis (no `optional`), and spliced into the API's URL
    password = container["args"][container["args"].index("--requirepass") + 1]
    assert password == "$(REDIS_PASSWORD)"
    redis_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert redis_env["REDIS_PASSWORD"] == redis_env["REDISCLI_AUTH"] == {"name": "cllm4rec-redis-auth",
                                                                           "key": "password"}
    api = one(docs, "Deployment", "cllm4rec-api")["spec"]["template"]
    api_env = [e["name"] for e in api["spec"]["containers"][0]["env"]]
    url = next(e for e in api["spec"]["containers"][0]["env"] if e["name"] == "CLLM4REC_REDIS_URL")
    assert url["value"] == f"redis://:$(REDIS_PASSWORD)@redis:{service['spec']['ports'][0]['port']}/0"
    assert api_env.index("REDIS_PASSWORD") < api_env.index("CLLM4REC_REDIS_URL")  # $(VAR) needs it defined first
    assert "CLLM4REC_REDIS_URL" not in one(docs, "ConfigMap")["data"]
    # only the API pods reach Redis
    policy = one(docs, "NetworkPolicy", "redis")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], redis["spec"]["template"]["metadata"]["labels"])
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert selects(allowed, api["metadata"]["labels"])
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]
    jobs = [d["spec"]["template"]["metadata"].get("labels", {}) for d in by_kind(docs, "Job")]
    assert not any(selects(allowed, labels) for labels in jobs)


def test_training_jobs_write_into_the_checkpoints_claim(overlay):
    name, docs = overlay
    claims = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["cllm4rec-checkpoints"]["spec"]["accessModes"]
    served = one(docs, "ConfigMap")["data"]["CLLM4REC_CHECKPOINT"]
    jobs = {d["metadata"]["name"]: d for d in by_kind(docs, "Job")}
    demo = jobs["cllm4rec-demo-checkpoint"]["spec"]["template"]["spec"]["containers"][0]
    assert demo["command"][-1] == "train-checkpoint" and demo["args"] == [Path(served).name, "--demo"]
    train = jobs["cllm4rec-train"]
    assert train["spec"]["suspend"] is True, "training waits for its dataset"
    for job in jobs.values():
        pod = job["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/checkpoints")
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
        assert not mount.get("readOnly")
    if name == "gpu":
        assert train["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def build_with_components(tmp_path: Path, overlay: str, components: tuple[str, ...]) -> list[dict]:
    """An overlay with optional components, as a user's own kustomization would combine them
    (setting the namespace again: it applies to the objects the components add)."""
    root = tmp_path / "kustomization"
    root.mkdir()
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731 (kustomize refuses absolute paths)
    base = yaml.safe_load((REPO / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": base["namespace"],
        "resources": [rel(REPO / "k8s" / "overlays" / overlay)],
        "components": [rel(REPO / "k8s" / "components" / c) for c in components],
    }))
    return kustomize(root)


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_optional_components_build_validate_and_match_the_api(tmp_path, overlay_name):
    docs = build_with_components(tmp_path, overlay_name, COMPONENTS)
    kubernetes_validate(docs, tmp_path)

    # servicemonitor: selects the API's Service and scrapes its named port.
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "cllm4rec-api")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    # hpa-in-flight: scales on a metric the server really exports.
    metric = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metric] == ["Pods"]
    assert metric[0]["pods"]["metric"]["name"] == service_metrics.requests_in_flight._name

    # external-redis: no in-cluster Redis left, the URL comes from a Secret.
    assert not by_kind(docs, "StatefulSet")
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "redis"]
    api = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    url = next(e for e in api["env"] if e["name"] == "CLLM4REC_REDIS_URL")
    assert url["valueFrom"]["secretKeyRef"] == {"name": "cllm4rec-redis", "key": "url"}


def test_multi_node_training_component_meets_through_pod_zero(tmp_path):
    docs = build_with_components(tmp_path, "gpu", ("multi-node-training",))
    kubernetes_validate(docs, tmp_path)
    job = one(docs, "Job", "cllm4rec-train-multinode")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert spec["completionMode"] == "Indexed" and spec["suspend"] is True
    assert spec["completions"] == spec["parallelism"]
    torchrun = next(e["value"] for e in container["env"] if e["name"] == "TORCHRUN_ARGS").split()
    assert torchrun[torchrun.index("--nnodes") + 1] == str(spec["completions"])
    per_node = int(torchrun[torchrun.index("--nproc-per-node") + 1])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == per_node  # one rank per GPU
    # The rendezvous endpoint is pod 0's name under the headless Service, which selects the Job's pods.
    service = one(docs, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    host, port = torchrun[torchrun.index("--rdzv-endpoint") + 1].split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    # Every pod reads the dataset and writes the one checkpoint directory.
    data = one(docs, "PersistentVolumeClaim", "cllm4rec-data")
    assert data["spec"]["accessModes"] == ["ReadWriteMany"]
    assert container["command"][-1] == "train-checkpoint"


def test_validation_catches_a_broken_manifest(tmp_path):
    """The validator is not a rubber stamp: a misspelt field fails the check."""
    docs = kustomize(REPO / "k8s" / "overlays" / "cpu")
    pdb = one(docs, "PodDisruptionBudget")
    pdb["spec"]["maxUnavailabel"] = pdb["spec"].pop("maxUnavailable")
    with pytest.raises(AssertionError, match="maxUnavailabel"):
        kubernetes_validate(docs, tmp_path)


# --- Prometheus and Grafana against a real server ------------------------------------------------

def scrape_job(config: dict) -> dict:
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "cllm4rec"]
    assert len(jobs) == 1, "docker/prometheus/prometheus.yml needs one scrape job named cllm4rec"
    return jobs[0]


def dashboard_targets() -> list[dict]:
    return [t for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]


def test_promtool_accepts_the_prometheus_config():
    run(tool("promtool"), "check", "config", PROMETHEUS_CONFIG)


def test_dashboard_covers_the_issue_panels_with_real_metrics():
    exprs = " ".join(t["expr"] for t in dashboard_targets())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(cllm4rec_http_request_duration_seconds_bucket" \
            in exprs
    for needed in ("cllm4rec_http_request_duration_seconds_count", "cllm4rec_batch_size_bucket",
                   "cllm4rec_batch_queue_wait_seconds_bucket", "cllm4rec_errors_total"):
        assert needed in exprs
    # Every metric the dashboard reads is one the server defines (service/metrics.py).
    defined = set()
    for metric in vars(service_metrics).values():
        if hasattr(metric, "_name") and hasattr(metric, "_type"):
            suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "info": ("_info",)}
            defined |= {metric._name + s for s in suffixes.get(metric._type, ("",))}
    used = set(re.findall(r"\bcllm4rec_[a-z_]+", exprs))
    assert used <= defined, f"the dashboard reads metrics the server does not export: {used - defined}"


class LoggedProcess:
    """A subprocess whose output goes to a log file, quoted (its end) when a test fails on it."""

    name = "process"

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log = log_path.open("w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_for(self, condition, what: str, timeout: float = 60):
        """condition()'s first true value, polled; the test fails if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited {self.process.returncode}: {self.log_text()}")
            try:
                value = condition()
                if value:
                    return value
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: not {what} within {timeout} s: {self.log_text()}")
            time.sleep(0.2)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class ServerProcess(LoggedProcess):
    """`cllm4rec serve` as users and the images start it: a subprocess, settings from the environment."""

    name = "cllm4rec serve"

    def __init__(self, checkpoint: Path, tmp_path: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = clean_env(CLLM4REC_CHECKPOINT=str(checkpoint), CLLM4REC_HOST="127.0.0.1", CLLM4REC_PORT=str(self.port),
                        CLLM4REC_TORCH_THREADS="1", **{f"CLLM4REC_{k.upper()}": str(v) for k, v in settings.items()})
        super().__init__([tool("cllm4rec"), "serve"], tmp_path / f"serve-{self.port}.log", env)
        self.wait_for(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 200, "ready", 120)


class PrometheusProcess(LoggedProcess):
    """A real Prometheus on the repository's scrape configuration, the target rewritten to a local
    server and the intervals shortened so a test sees several scrapes in seconds."""

    name = "prometheus"
    SCRAPE_INTERVAL = "1s"

    def __init__(self, tmp_path: Path, target: str):
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval=self.SCRAPE_INTERVAL, evaluation_interval=self.SCRAPE_INTERVAL)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        scrape_job(config)["static_configs"] = [{"targets": [target]}]
        for job in config["scrape_configs"]:
            if job["job_name"] == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__([tool("prometheus"), f"--config.file={config_path}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                         tmp_path / "prometheus.log")
        self.wait_for(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, "ready")

    def query(self, promql: str) -> list[dict]:
        answer = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", f"{promql}: {answer}"
        return answer["data"]["result"]


def send_traffic(url: str, user_ids: list[str], item_ids: list[str], rounds: int, api_key: str) -> dict[str, int]:
    """Every API endpoint, a bounded number of times, spread over a few scrapes; the count of 200s
    per endpoint template."""
    sent = {"/recommend": 0, "/recommend/{user_id}": 0, "/recommend/batch": 0, "/interactions": 0}
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {api_key}"}) as client:
        # First, one of each outcome the dashboard shows besides plain successes, so that their
        # series have been scraped a few times by the end (a rate needs two samples).
        assert client.post("/recommend", json={"user_id": user_ids[0], "k": 0}).status_code == 422
        assert client.post("/recommend", json={"user_id": "visitor-x", "k": 3,
                                               "history": item_ids[:2]}).json()["cold_start"] is True
        assert client.post("/recommend", json={"user_id": "visitor-y", "k": 3}).json()["fallback"] == "most_popular"
        for i in range(rounds):
            user = user_ids[i % len(user_ids)]
            calls = [
                ("/recommend", lambda: client.post("/recommend", json={"user_id": user, "k": 5})),
                ("/recommend/{user_id}", lambda: client.get(f"/recommend/{user}", params={"k": 3})),
                ("/recommend/batch", lambda: client.post("/recommend/batch", json={"requests": [
                    {"user_id": user, "k": 2}, {"user_id": user_ids[-1], "k": 2}]})),
                ("/interactions", lambda: client.post("/interactions", json={
                    "user_id": f"visitor-{i}", "item_ids": [item_ids[i % len(item_ids)]]})),
            ]
            for endpoint, call in calls:
                response = call()
                assert response.status_code == 200, response.text
                sent[endpoint] += 1
            time.sleep(0.1)
    return sent


def test_prometheus_scrapes_the_server_and_answers_latency_quantiles(tiny_checkpoint, tmp_path):
    """With an API key on every API endpoint, Prometheus still scrapes /metrics without one."""
    checkpoint = read_checkpoint(tiny_checkpoint)
    api_key = "prometheus-test-key-0123456789"
    server = ServerProcess(tiny_checkpoint, tmp_path, api_key=api_key, auth_reads="true")
    prometheus = None
    try:
        assert httpx.post(server.url + "/recommend", json={"user_id": checkpoint.user_ids[0]}).status_code == 401
        prometheus = PrometheusProcess(tmp_path, f"127.0.0.1:{server.port}")
        # A first scrape before the traffic, so the rate windows below see the counters grow.
        prometheus.wait_for(lambda: prometheus.query('up{job="cllm4rec"} == 1'), "scraping the server")
        sent = send_traffic(server.url, checkpoint.user_ids, checkpoint.item_ids, rounds=40, api_key=api_key)

        # The counters Prometheus holds equal what was sent, endpoint by endpoint: the labels are the
        # route templates and status codes the dashboard filters on.
        def counted() -> dict[str, float]:
            result = prometheus.query('sum by (endpoint) (cllm4rec_http_request_duration_seconds_count'
                                      '{status="200", endpoint=~"/recommend.*|/interactions"})')
            return {r["metric"]["endpoint"]: float(r["value"][1]) for r in result}
        prometheus.wait_for(lambda: counted().get("/interactions") == sent["/interactions"], "up to date")
        counts = counted()
        assert counts["/recommend/{user_id}"] == sent["/recommend/{user_id}"]
        assert counts["/recommend/batch"] == sent["/recommend/batch"]
        assert counts["/recommend"] == sent["/recommend"] + 2  # the cold-start and fallback requests

        window = "1m"  # many 1 s scrapes: the traffic and the scrape before it
        quantiles = {}
        for q in (0.5, 0.95, 0.99):
            result = prometheus.query(f"histogram_quantile({q}, sum by (le) "
                                      f"(rate(cllm4rec_http_request_duration_seconds_bucket[{window}])))")
            assert len(result) == 1, result
            quantiles[q] = float(result[0]["value"][1])
        largest_bucket = max(b for b in service_metrics.LATENCY_BUCKETS)
        assert all(math.isfinite(v) for v in quantiles.values()), quantiles
        assert 0 < quantiles[0.5] <= quantiles[0.95] <= quantiles[0.99] <= largest_bucket, quantiles

        # Every dashboard query is valid PromQL for this Prometheus, and the panels the issue names
        # show data. (Redis latency and 5xx stay empty: no Redis here, and no server error.)
        may_be_empty = ("redis", 'status=~"5..')
        for target in dashboard_targets():
            expr = target["expr"].replace("$__rate_interval", window).replace("$endpoint", ".*")
            result = prometheus.query(expr)
            if not any(word in expr for word in may_be_empty):
                assert result, f"no data for the dashboard query {expr}"
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
