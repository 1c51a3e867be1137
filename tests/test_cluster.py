"""The cluster manifests, checked offline: the launcher configs (cluster/aws.yaml, cluster/gcp.yaml) against the
installed Ray's own cluster-launcher schema and validation plus the project's rules, the KubeRay RayJob
(cluster/rayjob.yaml) by its structure, and the experiment each of them submits."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from alignment.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
ENTRY = "ray_jobs/run_experiment.py"
CLOUD = {"s3", "gs"}
SECRET_NAME = re.compile(r"(?i)secret|password|token|api_?key|access_?key|credential")


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ---- the VM cluster launcher configs -------------------------------------------------------------------------


def schema_errors(cfg: dict) -> list[str]:
    """What Ray's own ray-schema.json (the installed Ray's) says is wrong with a launcher config."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(cfg)]


def ray_validate(cfg: dict) -> None:
    """What `ray up` does before it touches a cloud: fill in the provider's defaults, then validate."""
    validate_config(prepare_config(copy.deepcopy(cfg)))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def launcher_problems(cfg: dict) -> list[str]:
    """The project's rules, beyond the schema (which takes 8.0 for an integer)."""
    problems = []
    top = cfg.get("max_workers")
    if not _is_int(top):
        problems.append(f"max_workers must be an int, got {top!r}")
    idle = cfg.get("idle_timeout_minutes")
    if not isinstance(idle, int | float) or isinstance(idle, bool) or idle <= 0:
        problems.append(f"idle_timeout_minutes must be set (> 0), got {idle!r}")
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if head not in types:
        return [*problems, f"head_node_type {head!r} is not a node type"]
    if types[head].get("resources", {}).get("head") != 1:
        problems.append("the head node type must advertise the custom resource head: 1")
    if types[head].get("max_workers", 0) != 0:
        problems.append("the head node type's max_workers must be 0")
    workers = {n: t for n, t in types.items() if n != head}
    gpu = {n for n, t in workers.items() if t.get("resources", {}).get("GPU", 0)}
    if not gpu or not set(workers) - gpu:
        problems.append("there must be a GPU worker type and a CPU-only worker type")
    for name, t in types.items():
        for key, value in t.get("resources", {}).items():
            if not _is_int(value):
                problems.append(f"{name}.resources.{key} must be an int, got {value!r}")
        for key in ("min_workers", "max_workers"):
            if key in t and not _is_int(t[key]):
                problems.append(f"{name}.{key} must be an int, got {t[key]!r}")
    for name in gpu:
        if workers[name].get("min_workers", 0) != 0:
            problems.append(f"GPU node type {name} must have min_workers 0")
    for name, t in workers.items():
        if "max_workers" not in t:
            problems.append(f"{name} must set max_workers")
        elif _is_int(top) and _is_int(t["max_workers"]) and t["max_workers"] > top:
            problems.append(f"{name}.max_workers {t['max_workers']} exceeds the global max_workers {top}")
    project = [remote for remote, local in (cfg.get("file_mounts") or {}).items() if local == "."]
    if not any(p in c and "pip install -e" in c for p in project for c in cfg.get("setup_commands", [])):
        problems.append("setup_commands must install the project from its file mount (pip install -e)")
    return problems


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_rays_schema_and_validation(name):
    cfg = _yaml(name)
    assert schema_errors(cfg) == []
    ray_validate(cfg)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_follows_the_project_rules(name):
    assert launcher_problems(_yaml(name)) == []


def test_launchers_share_one_layout():
    aws, gcp = (_yaml(n) for n in LAUNCHERS)
    assert aws["provider"]["type"] == "aws" and gcp["provider"]["type"] == "gcp"
    for key in ("max_workers", "idle_timeout_minutes", "head_node_type"):
        assert aws[key] == gcp[key], key
    layout = {n: (t["resources"], t.get("min_workers"), t.get("max_workers"))
              for n, t in aws["available_node_types"].items()}
    assert layout == {n: (t["resources"], t.get("min_workers"), t.get("max_workers"))
                      for n, t in gcp["available_node_types"].items()}


def _set(cfg: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(cfg)
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node[key]
    node[last] = value
    return out


SCHEMA_BREAKS = {
    "string resource": ("available_node_types.gpu_worker.resources.GPU", "8"),
    "fractional resource": ("available_node_types.head.resources.head", 0.5),
    "unknown top-level key": ("max_worker", 3),
    "unknown node type key": ("available_node_types.cpu_worker.min_worker", 1),
    "string max_workers": ("max_workers", "12"),
}


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("case", SCHEMA_BREAKS, ids=str)
def test_a_broken_launcher_fails_the_schema(name, case):
    bad = _set(_yaml(name), *SCHEMA_BREAKS[case])
    assert schema_errors(bad)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(bad)


RULE_BREAKS = {
    "GPU type kept up": ("available_node_types.gpu_worker.min_workers", 1),
    "float resource": ("available_node_types.gpu_worker.resources.GPU", 8.0),  # the schema takes 8.0
    "no head resource": ("available_node_types.head.resources", {"CPU": 8}),
    "worker over the global max": ("available_node_types.cpu_worker.max_workers", 13),
    "no idle timeout": ("idle_timeout_minutes", None),
    "no project install": ("setup_commands", ["python3 -m pip install -U pip"]),
}


@pytest.mark.parametrize("case", RULE_BREAKS, ids=str)
def test_a_launcher_that_breaks_a_rule_is_caught(case):
    bad = _set(_yaml("aws.yaml"), *RULE_BREAKS[case])
    assert launcher_problems(bad)


# ---- the commands the manifests and the README show ----------------------------------------------------------


def _commands(text: str) -> list[list[str]]:
    """Every `python ray_jobs/run_experiment.py ...` command in a text (comments or shell), as argv."""
    lines = [re.sub(r"^\s*#\s?", "", ln) for ln in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if ENTRY in line:
            argv = shlex.split(line[line.index("python "):].split("#")[0])
            found.append(argv[argv.index(ENTRY) + 1:])
    return found


def _config_and_overrides(args: list[str]) -> tuple[Path, list[str]]:
    assert args[0] == "--config", args
    return ROOT / args[1], args[2:]


def _check_submitted(args: list[str]):
    path, overrides = _config_and_overrides(args)
    assert path.is_file(), f"{path} does not exist in the repository"
    assert all("=" in o for o in overrides), overrides
    cfg = load_config(path, overrides)
    assert cfg.search_grid()
    return cfg, dict(o.split("=", 1) for o in overrides)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_the_launchers_submit_a_config_that_loads(name):
    commands = _commands((CLUSTER / name).read_text())
    assert commands
    for args in commands:
        cfg, overrides = _check_submitted(args)
        assert overrides.get("run_dir", "").startswith("/mnt/shared/")  # the shared file system of every node
        assert urlsplit(cfg.resources.storage_path or "").scheme in CLOUD


def test_the_readme_cluster_commands_load():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## On a cluster\n", 1)[1].split("\n## ", 1)[0]
    commands = _commands(section)
    assert commands
    for args in commands:
        _check_submitted(args)
    for name in [*LAUNCHERS, "rayjob.yaml"]:
        assert f"cluster/{name}" in section


# ---- the KubeRay RayJob --------------------------------------------------------------------------------------


def _groups(job: dict) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpu_limit(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group))


def _mounts(group: dict, claim: str) -> set[str]:
    """The paths where a group's containers mount the PersistentVolumeClaim `claim`."""
    pod = group["template"]["spec"]
    volumes = {v["name"] for v in pod.get("volumes", [])
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    paths = [{m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in volumes} for c in pod["containers"]]
    return set.intersection(*paths) if paths else set()


@pytest.fixture(scope="module")
def job() -> dict:
    docs = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(scope="module")
def claim() -> dict:
    return _yaml("shared-volume.yaml")


def test_rayjob_kind_and_lifecycle(job):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert _is_int(spec["backoffLimit"]) and spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # the submitter uploads the working_dir
    version = spec["rayClusterSpec"]["rayVersion"]
    assert version.split(".")[:2] == ray.__version__.split(".")[:2]


def test_rayjob_autoscales_with_gpu_workers_from_zero(job):
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert _is_int(spec["autoscalerOptions"]["idleTimeoutSeconds"])
    groups = _groups(job)
    workers = {n: g for n, g in groups.items() if n != "head"}
    gpu = {n for n, g in workers.items() if _gpu_limit(g) > 0}
    assert gpu and set(workers) - gpu, "a GPU worker group and a CPU worker group"
    for name in gpu:
        g = workers[name]
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, name
        assert int(g["rayStartParams"]["num-gpus"]) == _gpu_limit(g), name
    for name, g in workers.items():
        assert _is_int(g["minReplicas"]) and _is_int(g["maxReplicas"]) and g["minReplicas"] <= g["maxReplicas"], name
    for name, g in groups.items():
        for key in ("num-cpus", "num-gpus"):
            if key in g["rayStartParams"]:
                assert re.fullmatch(r"\d+", g["rayStartParams"][key]), (name, key)
    assert _gpu_limit(groups["head"]) == 0


def test_rayjob_head_advertises_the_head_resource(job):
    raw = _groups(job)["head"]["rayStartParams"]["resources"]
    # KubeRay's format: a JSON object in a quoted string, '"{\"head\": 1}"'.
    assert raw.startswith('"') and raw.endswith('"')
    resources = json.loads(raw[1:-1].replace('\\"', '"'))
    assert resources == {"head": 1} and all(_is_int(v) for v in resources.values())


def test_rayjob_state_outlives_its_cluster(job, claim):
    """run_dir on the ReadWriteMany volume every pod mounts, Ray Train/Tune state under a cloud storage_path."""
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    name = claim["metadata"]["name"]
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["python", ENTRY] and (ROOT / ENTRY).is_file()
    cfg, overrides = _check_submitted(args[2:])
    assert urlsplit(overrides["resources.storage_path"]).scheme in CLOUD
    assert cfg.resources.storage_path == overrides["resources.storage_path"]
    run_dir = PurePosixPath(overrides["run_dir"])
    assert run_dir.is_absolute() and cfg.run_dir == str(run_dir)
    for group_name, group in _groups(job).items():
        mounts = _mounts(group, name)
        assert any(run_dir.is_relative_to(m) for m in mounts), f"{group_name} does not mount {run_dir}'s volume"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert PurePosixPath(env["working_dir"]).is_absolute()


def test_rayjob_carries_no_credentials(job):
    for group_name, group in _groups(job).items():
        for c in _containers(group):
            for var in c.get("env", []):
                assert not (SECRET_NAME.search(var["name"]) and "value" in var), (group_name, var["name"])
    for key, value in re.findall(r"(\S+)=(\S+)", job["spec"]["entrypoint"]):
        assert not SECRET_NAME.search(key) and "@" not in value, key
