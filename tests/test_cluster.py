"""cluster/: every config checked offline by every means available (no cloud is reachable).

- every YAML parses;
- the launcher config passes Ray's own validation (`prepare_config` + `validate_config`, the
  steps `ray up` runs before it talks to AWS, against `ray/autoscaler/ray-schema.json`);
- the runtime_env is accepted by Ray's `RuntimeEnv`;
- the KubeRay manifests have the fields their CRDs require (documented list below);
- every `python -m jobs.X ...` entrypoint in cluster/ and the READMEs parses with that job's own
  `build_parser()`, abbreviations refused, so renaming a flag breaks this test;
- every labeling entrypoint passes the job's own settings validation (--catalog, --output-table,
  --cache), and every place that runs one on the cluster (cluster/runtime_env.yaml, each RayJob's
  runtimeEnvYAML) configures its catalog: pyiceberg itself reads the variables and opens a Glue
  catalog in the cluster's region with a warehouse, and no catalog setting holds a credential;
- resource requests fit the instance types; nothing is exposed publicly; no credentials.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
DOCS = [p for p in (CLUSTER / "README.md", ROOT / "README.md") if p.exists()]

# AWS published specs of the instance types chosen: (vCPU, GiB RAM, GPUs).
INSTANCES = {"m5.xlarge": (4, 16, 0), "g4dn.xlarge": (4, 16, 1), "g5.2xlarge": (8, 32, 1)}

# Required fields of the ray.io/v1 CRDs. No PyPI package ships the KubeRay CRD schemas
# (checked: codeflare-sdk 0.40.1 and krayne 0.3.8 wheels carry none), so this list is written
# from KubeRay's CRDs and Go types (ray-operator/config/crd/bases/ray.io_raycronjobs.yaml and
# ray-operator/apis/ray/v1/raycluster_types.go; docs: "KubeRay CRD API reference", v1.6.2):
# RayCronJob.spec requires jobTemplate and schedule; RayClusterSpec requires headGroupSpec;
# HeadGroupSpec requires template; WorkerGroupSpec requires groupName and template. Older CRDs
# (< v1.4) also required rayStartParams, minReplicas and maxReplicas; we demand those too so the
# manifests apply on either. A Pod template needs spec.containers, each with name and image.
# RayJob's spec has no CRD-required field; we require entrypoint (no interactive mode here)
# and one of clusterSelector / rayClusterSpec (the operator rejects a RayJob with neither).
HEAD_REQUIRED = ("template", "rayStartParams")
WORKER_REQUIRED = ("groupName", "template", "rayStartParams", "minReplicas", "maxReplicas")
CRONJOB_REQUIRED = ("schedule", "jobTemplate")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests(kind: str) -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p) if d.get("kind") == kind]


def rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec: the RayJobs' own and each RayCronJob's jobTemplate."""
    return ([(name, d["spec"]) for name, d in manifests("RayJob")]
            + [(name, d["spec"]["jobTemplate"]) for name, d in manifests("RayCronJob")])


def test_cluster_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"aws.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
            "kuberay/raycronjob-label.yaml", "kuberay/rayjob-backfill.yaml"} <= names
    assert (CLUSTER / "README.md").exists()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    assert load_docs(path), f"{path} holds no YAML document"


# --- Ray cluster launcher (AWS) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_launcher_config_passes_ray_validation(aws):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before contacting the cloud: fill in the provider's defaults, then
    # validate against ray-schema.json plus Ray's own consistency checks.
    validate_config(prepare_config(copy.deepcopy(aws)))
    # And the file as written, so a typo'd top-level key can't hide behind the defaults.
    import json
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)


def test_launcher_validation_can_fail(aws):
    """The check above is real: Ray rejects an unknown node-type field."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(aws)
    bad["available_node_types"]["head"]["num_gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_launcher_node_types(aws):
    import ray

    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must run no tasks"
    for name, spec in types.items():
        instance = spec["node_config"]["InstanceType"]
        vcpu, _, gpus = INSTANCES[instance]
        assert spec["resources"].get("GPU", 0) == gpus, f"{name}: GPU resource != GPUs of {instance}"
        assert spec["resources"].get("CPU", 0) <= vcpu, f"{name}: more CPUs than {instance} has"
        if name != aws["head_node_type"]:
            assert spec["min_workers"] == 0, f"{name} must scale from zero"
            assert spec["max_workers"] >= 1
        # S3 through the instance profile; a pre-made security group (else Ray opens SSH to the world).
        assert "IamInstanceProfile" in spec["node_config"], name
        assert spec["node_config"].get("SecurityGroupIds"), name
    assert types["t4_scoring"]["node_config"]["InstanceType"] == "g4dn.xlarge"
    assert sum(t["max_workers"] for n, t in types.items() if n != aws["head_node_type"]) <= aws["max_workers"]
    # Pinned image: same Ray as installed here (pyproject pins it), never `latest`.
    image = aws["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image


def test_launcher_token_auth_and_private_dashboard(aws):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in aws[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    # The token reaches every node as a file copied from the user's machine.
    assert aws["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "security_group" not in aws["provider"], "no extra ingress rules"


def test_runtime_env_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert ".venv/" in env["excludes"], "the venv must never be uploaded with the working_dir"


# --- KubeRay -----------------------------------------------------------------------------------

def check_pod_template(where: str, template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: template.spec.containers is empty"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container lacks name or image"
    return containers


def test_kuberay_manifests_have_required_fields():
    kinds = {d["kind"] for p in KUBERAY.glob("*.yaml") for d in load_docs(p)}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds
    for p in sorted(KUBERAY.glob("*.yaml")):
        for d in load_docs(p):
            assert d.get("apiVersion") and d.get("kind"), p.name
            meta = d.get("metadata", {})
            assert meta.get("name") or meta.get("generateName"), f"{p.name}: metadata.name"
            if d["apiVersion"].startswith("ray.io/"):
                assert d["apiVersion"] == "ray.io/v1", p.name
    for name, d in manifests("RayCluster"):
        spec = d["spec"]
        for field in HEAD_REQUIRED:
            assert field in spec["headGroupSpec"], f"{name}: headGroupSpec.{field}"
        check_pod_template(f"{name} head", spec["headGroupSpec"]["template"])
        for g in spec["workerGroupSpecs"]:
            for field in WORKER_REQUIRED:
                assert field in g, f"{name}: workerGroupSpecs[{g.get('groupName')}].{field}"
            check_pod_template(f"{name} {g['groupName']}", g["template"])
    for name, d in manifests("RayCronJob"):
        for field in CRONJOB_REQUIRED:
            assert field in d["spec"], f"{name}: spec.{field}"
        assert len(d["spec"]["schedule"].split()) == 5, f"{name}: schedule is not a 5-field cron"
    for name, spec in rayjob_specs():
        assert spec.get("entrypoint"), f"{name}: entrypoint"
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), \
            f"{name}: give exactly one of clusterSelector / rayClusterSpec"


def test_kuberay_cluster_resources_security_and_pins():
    import ray

    (name, cluster), = manifests("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "the head must run no tasks"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    selectors = []
    for group_name, tpl in [("head", spec["headGroupSpec"]["template"])] + [
            (n, g["template"]) for n, g in groups.items()]:
        instance = tpl["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        vcpu, ram_gib, gpus = INSTANCES[instance]
        selectors.append(instance)
        assert tpl["spec"].get("serviceAccountName"), f"{group_name}: S3 via IRSA service account"
        for c in check_pod_template(group_name, tpl):
            req = c["resources"]["requests"]
            assert float(req["cpu"]) < vcpu, f"{group_name}: {req['cpu']} CPU won't fit {instance}"
            assert int(str(req["memory"]).removesuffix("Gi")) < ram_gib, f"{group_name}: memory > {instance}"
            assert int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) == gpus, \
                f"{group_name}: GPU limit != GPUs of {instance} (one scoring actor per T4)"
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, f"unpinned image {c['image']}"
            assert ray.__version__ in tag, f"image tag {tag} should name the Ray version"
        if gpus:
            assert any(t.get("key") == "nvidia.com/gpu" for t in tpl["spec"]["tolerations"])
    assert "g4dn.xlarge" in selectors
    for g in groups.values():
        assert g["minReplicas"] == 0, f"{g['groupName']} must scale from zero"
    # No public exposure anywhere in cluster/ (the data, not the comments that explain it).
    text = "\n".join(yaml.safe_dump_all(load_docs(p)) for p in YAML_FILES)
    for exposed in ("LoadBalancer", "NodePort", "0.0.0.0/0", "enableIngress: true"):
        assert exposed not in text, exposed


def test_rayjobs_use_the_same_env_as_runtime_env():
    env_vars = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
    (cluster_name, cluster), = manifests("RayCluster")
    for name, spec in rayjob_specs():
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == env_vars, name
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}, name


# --- Entrypoints: every command parses with the job's own parser -------------------------------

JOB_RE = re.compile(r"python -m (jobs\.\w+)(.*)")


def entrypoints(submitted_only: bool = False) -> list[tuple[str, str, list[str]]]:
    """(source, module, argv) for every `python -m jobs.X ...` in cluster/ and the READMEs;
    with submitted_only, just those that run on the cluster (RayJobs, `ray job submit` lines),
    not the laptop examples."""
    found = []
    for name, spec in rayjob_specs():
        m = JOB_RE.search(" ".join(spec["entrypoint"].split()))
        assert m, f"{name}: entrypoint is not `python -m jobs.X ...`"
        found.append((name, m.group(1), shlex.split(m.group(2))))
    for doc in DOCS:
        # Commands in fenced blocks, with backslash continuations joined.
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                m = JOB_RE.search(line.split("#")[0])
                if m and (not submitted_only or "ray job submit" in line):
                    argv = []
                    for tok in shlex.split(m.group(2)):
                        if tok in ("|", "&&", ";", "||", ">", "2>&1"):
                            break
                        argv.append(tok)
                    found.append((doc.relative_to(ROOT).as_posix(), m.group(1), argv))
    return found


ENTRYPOINTS = entrypoints()
ON_CLUSTER = entrypoints(submitted_only=True)


def test_entrypoints_cover_every_job():
    assert {mod for _, mod, _ in ENTRYPOINTS} >= {"jobs.train", "jobs.label", "jobs.backfill", "jobs.table"}
    assert any(src == "cluster/README.md" for src, _, _ in ENTRYPOINTS)


@pytest.mark.parametrize("source,module,argv", ENTRYPOINTS,
                         ids=[f"{s}:{m}:{i}" for i, (s, m, _) in enumerate(ENTRYPOINTS)])
def test_entrypoint_parses_with_the_jobs_own_parser(source, module, argv):
    parse(source, module, argv)


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No abbreviated flags: argparse would otherwise take a removed flag for a longer one that
    starts like it (the old `--output s3://...` of jobs.label parses as `--output-table`)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)
    return parser


def parse(source, module, argv):
    parser = strict(importlib.import_module(module).build_parser())
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{source}: `python -m {module} {shlex.join(argv)}` is rejected by "
                    f"{module}.build_parser() (exit {e.code}; abbreviated flags are refused); "
                    f"fix the command or the flag name")


def test_parse_refuses_a_removed_flag():
    """The check above is real: the labeling jobs' old `--output` flag fails it."""
    argv = ["--model", "s3://b/m", "--input", "s3://b/l", "--output", "s3://b/labeled"]
    with pytest.raises(pytest.fail.Exception, match="rejected"):
        parse("test", "jobs.label", argv)


def test_entrypoints_ask_for_the_gpus_the_cluster_has():
    """Scoring: one actor per T4, no more actors than T4 nodes; training: GPU workers that fit."""
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    (_, cluster), = manifests("RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    t4_max = min(aws["t4_scoring"]["max_workers"], groups["t4-scoring"]["maxReplicas"])
    train_max = min(aws["a10g_training"]["max_workers"], groups["a10g-training"]["maxReplicas"])
    train_cpus = min(aws["a10g_training"]["resources"]["CPU"],
                     float(groups["a10g-training"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]))
    assert ON_CLUSTER
    for source, module, argv in ON_CLUSTER:
        args = parse(source, module, argv)
        if module in ("jobs.label", "jobs.backfill"):
            assert args.gpus_per_actor == 1, f"{source}: {module} must run one actor per T4"
            assert 1 <= args.actors <= t4_max, f"{source}: --actors {args.actors} > {t4_max} T4 nodes"
        elif module == "jobs.train":
            assert args.use_gpu, f"{source}: training on the cluster runs on GPU workers"
            assert args.num_workers <= train_max, f"{source}: more train workers than GPU nodes"
            assert args.cpus_per_worker <= train_cpus, f"{source}: --cpus-per-worker won't fit a node"


# --- The labeled table: every labeling entrypoint names a catalog, every place configures it ----

LABEL_JOBS = ("jobs.label", "jobs.backfill")
CATALOG_JOBS = LABEL_JOBS + ("jobs.table",)
# Catalog property names (after pyiceberg's env-var mapping) that would hold a credential.
SECRET_PROPERTY = re.compile(r"(?i)key|secret|token|credential|password|session")
LABEL_ENTRYPOINTS = [e for e in ENTRYPOINTS if e[1] in LABEL_JOBS]


@pytest.mark.parametrize("source,module,argv", LABEL_ENTRYPOINTS,
                         ids=[f"{s}:{m}:{i}" for i, (s, m, _) in enumerate(LABEL_ENTRYPOINTS)])
def test_label_entrypoints_pass_the_jobs_own_validation(source, module, argv):
    """--catalog, --output-table NS.TABLE and --cache are required by the job (not by argparse):
    LabelSettings.validate(), which the job runs first, must accept every documented command."""
    from clf_core.errors import ConfigError
    from clf_core.labeling import settings_from_args

    args = parse(source, module, argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        pytest.fail(f"{source}: `python -m {module} {shlex.join(argv)}` fails the job's validation: {exc}")
    assert settings.catalog and "." in settings.output_table and settings.cache


def catalog_jobs_on_cluster() -> list[tuple[str, str, argparse.Namespace]]:
    return [(source, module, parse(source, module, argv))
            for source, module, argv in ON_CLUSTER if module in CATALOG_JOBS]


def test_cluster_label_jobs_use_s3_and_the_nightly_exports_review():
    on_cluster = catalog_jobs_on_cluster()
    assert {m for _, m, _ in on_cluster} >= set(LABEL_JOBS)
    for source, module, args in on_cluster:
        if module not in LABEL_JOBS:
            continue
        for flag in ("model", "input", "cache"):
            assert getattr(args, flag).startswith("s3://"), f"{source}: --{flag} must be in S3 on the cluster"
        assert args.review_export in ("",) or args.review_export.startswith("s3://"), source
    nightly = [args for name, d in manifests("RayCronJob")
               for source, module, args in on_cluster if source == name and module == "jobs.label"]
    assert nightly and all(a.review_export.startswith("s3://") for a in nightly), \
        "the nightly RayCronJob exports the review rows (--review-export s3://...)"


def submit_commands() -> list[tuple[str, list[str], str]]:
    """(source, `ray job submit` options, job module) for every documented submit of a job."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#")[0]
                if "ray job submit" in line and (m := JOB_RE.search(line)):
                    opts = shlex.split(line[line.index("ray job submit") + len("ray job submit"):m.start()])
                    found.append((doc.relative_to(ROOT).as_posix(), opts, m.group(1)))
    return found


def catalog_places() -> dict[str, dict]:
    """Where the jobs that use a catalog on the cluster get their environment: the runtime env of
    every `ray job submit` (the only way jobs reach the launcher's cluster, cluster/aws.yaml, and the
    ad-hoc way onto KubeRay) and each RayJob / RayCronJob's runtimeEnvYAML."""
    places = {"cluster/runtime_env.yaml": yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]}
    for name, spec in rayjob_specs():
        m = JOB_RE.search(" ".join(spec["entrypoint"].split()))
        if m and m.group(1) in CATALOG_JOBS:
            places[f"{name} runtimeEnvYAML"] = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    return places


def check_catalog_env(where: str, env_vars: dict, name: str, region: str, monkeypatch, home: Path) -> dict:
    """Assert that `env_vars` configure pyiceberg catalog `name` as the AWS Glue catalog of `region`
    with an S3 warehouse and no credential; return the catalog config pyiceberg reads from them."""
    from pyiceberg.utils.config import Config

    prefix = f"PYICEBERG_CATALOG__{name.upper()}__"
    mine = {k: str(v) for k, v in env_vars.items() if k.upper().startswith(prefix)}
    assert mine.get(prefix + "TYPE") == "glue", f"{where}: {prefix}TYPE is {mine.get(prefix + 'TYPE')!r}, not glue"
    assert mine.get(prefix + "WAREHOUSE", "").startswith("s3://"), f"{where}: {prefix}WAREHOUSE is not an s3:// URI"
    hits = find_secrets("\n".join(f"{k}: {v}" for k, v in mine.items()))
    assert not hits, f"{where}: catalog settings look like credentials: {hits}"

    # What pyiceberg itself makes of the variables (no .pyiceberg.yaml can interfere: empty home).
    for var in [v for v in os.environ if v.upper().startswith("PYICEBERG_")]:
        monkeypatch.delenv(var)
    for var in ("HOME", "PYICEBERG_HOME"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.chdir(home)
    for k, v in env_vars.items():
        monkeypatch.setenv(k, str(v))
    config = Config().get_catalog_config(name) or {}
    assert config.get("type") == "glue", f"{where}: pyiceberg reads catalog {name!r} as {config}"
    assert config.get("glue.region") == region, \
        f"{where}: catalog {name!r} has glue.region {config.get('glue.region')!r}, the cluster runs in {region}"
    assert config.get("warehouse") == mine[prefix + "WAREHOUSE"], f"{where}: warehouse not read as set"
    secret_props = sorted(k for k in config if SECRET_PROPERTY.search(k))
    assert not secret_props, f"{where}: credentials in the catalog config {secret_props}: use the role, not keys"

    # And the jobs' own way of opening it builds a Glue client for that region (no network call).
    pytest.importorskip("boto3")
    from clf_core.errors import ConfigError
    from clf_core.table import open_catalog

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    try:
        catalog = open_catalog(name)
    except ConfigError as exc:
        raise AssertionError(f"{where}: {exc}") from exc
    assert type(catalog).__name__ == "GlueCatalog", f"{where}: {type(catalog).__name__}"
    assert catalog.glue.meta.region_name == region, where
    return config


def test_catalog_settings_reach_every_job_on_the_cluster(monkeypatch, tmp_path):
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    region = aws["provider"]["region"]
    names = {args.catalog for _, _, args in catalog_jobs_on_cluster()}
    assert names and "" not in names, f"every catalog job on the cluster names --catalog: {names}"
    places = catalog_places()
    assert {"cluster/runtime_env.yaml", "raycronjob-label.yaml runtimeEnvYAML",
            "rayjob-backfill.yaml runtimeEnvYAML"} <= set(places), sorted(places)
    for where, env_vars in places.items():
        for name in sorted(names):
            check_catalog_env(where, env_vars, name, region, monkeypatch, tmp_path)
    # Every documented submit of a catalog job brings cluster/runtime_env.yaml: the nodes of either
    # cluster hold no catalog setting (one copy, per job; aws.yaml and raycluster.yaml say why).
    submits = [(src, opts) for src, opts, mod in submit_commands() if mod in CATALOG_JOBS]
    assert any(src == "cluster/README.md" for src, _ in submits)
    for source, opts in submits:
        assert "--runtime-env" in opts and opts[opts.index("--runtime-env") + 1] == "cluster/runtime_env.yaml", \
            f"{source}: `ray job submit {shlex.join(opts)}` runs a catalog job without cluster/runtime_env.yaml"
    for path in (CLUSTER / "aws.yaml", KUBERAY / "raycluster.yaml"):
        assert "PYICEBERG_" not in yaml.safe_dump_all(load_docs(path)), \
            f"{path.name}: catalog settings belong in cluster/runtime_env.yaml (a second copy could disagree)"


@pytest.mark.parametrize("change", ["no-warehouse", "misspelled-region", "other-region", "rest", "key",
                                    "other-catalog"])
def test_catalog_check_can_fail(change, monkeypatch, tmp_path):
    """The check above is real: each of these broken settings fails it."""
    env = dict(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"])
    name, region = "ledgers", "us-west-2"
    check_catalog_env("ok", env, name, region, monkeypatch, tmp_path)     # the file as it is passes
    if change == "no-warehouse":
        del env["PYICEBERG_CATALOG__LEDGERS__WAREHOUSE"]
    elif change == "misspelled-region":                                   # pyiceberg reads glue-region
        env["PYICEBERG_CATALOG__LEDGERS__GLUE_REGION"] = env.pop("PYICEBERG_CATALOG__LEDGERS__GLUE__REGION")
    elif change == "other-region":
        region = "eu-central-1"
    elif change == "rest":
        env["PYICEBERG_CATALOG__LEDGERS__TYPE"] = "rest"
    elif change == "key":                                                 # built here, never in a file
        env["PYICEBERG_CATALOG__LEDGERS__GLUE__SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    elif change == "other-catalog":
        name = "labels"
    with pytest.raises(AssertionError):
        check_catalog_env(change, env, name, region, monkeypatch, tmp_path)


# --- No credentials anywhere under cluster/ ----------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_secret_access_key|aws_session_token",
    "AWS secret key value": r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    "literal Ray token": r"RAY_AUTH_TOKEN\s*[:=]\s*\S|name:\s*RAY_AUTH_TOKEN\s*\n\s*value:",
    "password": r"(?i)password\s*[:=]\s*\S",
}


def find_secrets(text: str) -> list[str]:
    return [what for what, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]


def test_no_credentials_in_cluster_files():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        hits = find_secrets(path.read_text(errors="replace"))
        assert not hits, f"{path.relative_to(ROOT)} looks like it holds credentials: {hits}"


def test_credential_scan_can_fail():
    """The scanner catches what it claims to (keys built here, never written to a file)."""
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert "AWS access key id" in find_secrets(f"id: {key_id}")
    assert "AWS secret key value" in find_secrets(f"secret: {secret}")
    assert "AWS secret key setting" in find_secrets("aws_secret_access_key = x")
    assert "literal Ray token" in find_secrets("- name: RAY_AUTH_TOKEN\n  value: abc")
