"""deploy/'s launch files: they parse, name real entry points with flags those accept, use the
project's images, and the RayService's Serve config builds the application `make serve` runs."""

import argparse
import glob
import os
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml

from conftest import REPO

DEPLOY = os.path.join(REPO, "deploy")
VERSION = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["version"]
IMAGES = {f"retro-db:{VERSION}-cpu", f"retro-db:{VERSION}-gpu"}


def _yaml(name):
    """The first document of a deploy file (the others: ``_documents``)."""
    return _documents(name)[0]


def _documents(name) -> list:
    return [d for d in yaml.safe_load_all(open(os.path.join(DEPLOY, name))) if d is not None]


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("image", "worker_image") and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _beam_flags(options_class) -> set[str]:
    """Every flag Beam's registered option classes accept (a flag's name may differ from its dest)."""
    parser = argparse.ArgumentParser(conflict_handler="resolve")
    todo = [options_class]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "_add_argparse_args" in vars(cls):
            cls._add_argparse_args(parser)
    return {flag.lstrip("-") for action in parser._actions for flag in action.option_strings}


def _check_cli(argv: list[str]) -> None:
    """``python -m <module> args``: the module's own parser accepts them; leftovers are Beam options."""
    import apache_beam.runners.dask.dask_runner  # noqa: F401  (registers the Dask runner's options)
    from apache_beam.options.pipeline_options import PipelineOptions

    assert argv[:2] == ["python", "-m"], argv
    module, args = argv[2], argv[3:]
    if module == "pipeline":
        from pipeline.__main__ import build_parser
    elif module == "model.train":
        from model.train import build_parser
    elif module == "index_service":
        from index_service.__main__ import build_parser
    else:
        raise AssertionError(f"unknown entry point {module}")
    _, unknown = build_parser().parse_known_args(args)
    assert module == "pipeline" or not unknown, f"{module} does not accept {unknown}"
    known = _beam_flags(PipelineOptions)
    for flag in unknown:
        name = flag.split("=")[0].lstrip("-")
        assert flag.startswith("--") and name in known, f"{module}: {flag} is neither ours nor a Beam option"


def _script_command(path: str, marker: str) -> list[str]:
    """The command line that starts with ``marker`` in a shell script, continuations joined and
    ${VAR:-default} / ${VAR:?...} / $VAR replaced by placeholders."""
    text = open(path).read().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.strip().startswith(marker))
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", line)
    line = re.sub(r"\$\{(\w+)(:\?[^}]*)?\}|\$(\w+)", "x", line)
    return shlex.split(line)


def test_every_yaml_parses_and_uses_the_project_images():
    files = glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True)
    assert len(files) >= 4
    for f in files:
        assert _documents(f), f
    images = {i for f in files for i in _images(_documents(f))}
    assert images and images <= IMAGES, images - IMAGES


def test_dockerfile_copies_what_exists_and_installs_the_lock():
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert os.path.exists(os.path.join(REPO, path)), path
    assert "requirements.lock" in text and "pip install --no-deps --no-build-isolation -e ." in text
    for tag in IMAGES:
        assert f"-t {tag}" in text


def test_rayservice_serve_config_builds_the_make_serve_application(db, tmp_path):
    from ray.serve._private.api import (
        call_user_app_builder_with_args_if_necessary as serve_builds,
    )  # what serve run/deploy call
    from ray.serve.schema import ServeDeploySchema

    from index_service.app import build_app

    service = _yaml("kuberay/rayservice-index.yaml")
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(_yaml("serve.yaml"))
    (app,), (local_app,) = config.applications, local.applications
    assert app.import_path == local_app.import_path == "index_service.app:build_app"
    secret = tmp_path / "admin-tokens"  # what the Secret's volume holds in the cluster
    secret.write_text("ops:" + "0" * 64)
    assert (
        type(serve_builds(build_app, {**app.args, "db": db, "admin_token_file": str(secret)})).__name__ == "Application"
    )  # every arg is a ServiceConfig field


def _pods(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def _policy_for(docs: list, labels: dict) -> dict:
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    return policy


def test_rayservice_serves_a_read_only_db_writes_only_deletions_takes_its_token_from_a_secret_and_exposes_only_serve():
    docs = _documents("kuberay/rayservice-index.yaml")
    service = docs[0]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for pod in _pods(service["spec"]["rayClusterConfig"]):
        (container,) = pod["spec"]["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        db = mounts[args["db"]]
        assert db["readOnly"] and volumes[db["name"]]["persistentVolumeClaim"]["readOnly"]
        deleted = mounts[args["db"] + "/deleted"]  # the one path the service writes (retro_db.deletions)
        assert not deleted.get("readOnly") and claims[volumes[deleted["name"]]["persistentVolumeClaim"]["claimName"]][
            "spec"
        ]["accessModes"] == ["ReadWriteMany"]
        secret = mounts[os.path.dirname(args["admin_token_file"])]
        assert secret["readOnly"] and "secretName" in volumes[secret["name"]]["secret"]
        assert not [
            e for e in container.get("env", []) if "TOKEN" in e["name"] and "value" in e
        ]  # no token in the manifest
        assert [p["containerPort"] for p in container.get("ports", [])] in ([], [8000])
    policy = _policy_for(docs, service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"])
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == [8000]
    dashboard = [rule for rule in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in rule.get("ports", []))]
    assert dashboard and all("namespaceSelector" in source for rule in dashboard for source in rule["from"])
    assert "dashboard-host" not in service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]


def test_rayjob_and_cluster_launcher_keep_the_job_api_private():
    docs = _documents("kuberay/rayjob-build-db.yaml")
    policy = _policy_for(docs, docs[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"])
    assert all("from" in rule for rule in policy["spec"]["ingress"])  # nothing open to all
    head = " ".join(_yaml("ray-cluster.yaml")["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_rayjob_and_cluster_launcher_run_real_commands():
    job = _yaml("kuberay/rayjob-build-db.yaml")
    assert job["kind"] == "RayJob"
    _check_cli(shlex.split(job["spec"]["entrypoint"]))
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-embed"]["template"]["spec"]["containers"][0]
    assert gpu["image"].endswith("-gpu") and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cluster = _yaml("ray-cluster.yaml")
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert all(c.startswith("ray ") for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])


def test_dask_cluster_runs_the_project_image_with_single_threaded_workers():
    cluster = _yaml("dask/dask-cluster.yaml")
    assert cluster["kind"] == "DaskCluster" and cluster["apiVersion"] == "kubernetes.dask.org/v1"
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert worker["args"][:2] == ["dask", "worker"] and worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    port = scheduler["args"][scheduler["args"].index("--port") + 1]
    script = _script_command(os.path.join(DEPLOY, "beam", "dask.sh"), "python -m pipeline")
    name = cluster["metadata"]["name"]
    assert (
        "--runner=DaskRunner" in script
        and open(os.path.join(DEPLOY, "beam", "dask.sh")).read().count(f"tcp://{name}-scheduler:{port}") == 1
    )


@pytest.mark.parametrize(
    "script, marker",
    [
        ("beam/dataflow.sh", "python -m pipeline"),
        ("beam/flink.sh", "python -m pipeline"),
        ("beam/dask.sh", "python -m pipeline"),
        ("torchrun/train-multinode.sh", "torchrun"),
    ],
)
def test_launch_scripts_are_valid_shell_and_call_real_entry_points(script, marker):
    path = os.path.join(DEPLOY, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert os.access(path, os.X_OK)
    argv = _script_command(path, marker)
    if marker == "torchrun":
        argv = ["python"] + argv[argv.index("-m") :]
    _check_cli(argv)
