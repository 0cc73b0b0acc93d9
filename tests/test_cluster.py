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
- resource requests fit the instance types; nothing is exposed publicly; no credentials;
- every image (KubeRay containers, the launcher's docker image, the Dockerfile's base) is pinned
  by digest;
- the NetworkPolicies let into the Ray pods only their own cluster's pods and, on the head's
  dashboard/job port, the KubeRay operator (evaluated pod by pod, source by source);
- training and labeling run on separate Ray clusters under separate service accounts with
  separate IAM roles, and each RayJob runs on the cluster of its kind.
Each check has a `..._can_fail` test that feeds it broken copies.
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
            "kuberay/raycronjob-label.yaml", "kuberay/rayjob-backfill.yaml", "kuberay/serviceaccount.yaml",
            "kuberay/networkpolicy.yaml"} <= names
    assert (CLUSTER / "Dockerfile").exists()
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

def kuberay() -> dict:
    """Every KubeRay object the manifests make, as plain data the checks below take (and the
    `..._can_fail` tests break a copy of): the RayClusters by name, every RayJob spec (a RayJob's
    own, each RayCronJob's jobTemplate), the ServiceAccounts, the NetworkPolicies."""
    return {
        "clusters": {d["metadata"]["name"]: d["spec"] for _, d in manifests("RayCluster")},
        "jobs": dict(rayjob_specs()),
        "accounts": [d for _, d in manifests("ServiceAccount")],
        "policies": [d for _, d in manifests("NetworkPolicy")],
    }


def generated_name(job_source: str, job_spec: dict) -> str:
    """The name KubeRay gives the RayCluster of a RayJob that brings its own: <RayJob name>-<random>."""
    return job_source.removesuffix(".yaml") + "-generated-x7k2q"


def cluster_specs(k: dict) -> dict[str, tuple[str, dict]]:
    """Every Ray cluster the manifests make: name -> (where it is defined, RayClusterSpec); a RayJob
    with a rayClusterSpec makes one under a generated name."""
    found = {name: (f"RayCluster {name}", spec) for name, spec in k["clusters"].items()}
    for source, job in k["jobs"].items():
        if "rayClusterSpec" in job:
            found[generated_name(source, job)] = (f"{source} rayClusterSpec", job["rayClusterSpec"])
    return found


def job_cluster(k: dict, source: str, job: dict) -> str | None:
    """The name of the Ray cluster a RayJob spec runs on (None: a selector no RayCluster matches)."""
    if "rayClusterSpec" in job:
        return generated_name(source, job)
    wanted = job.get("clusterSelector", {}).get("ray.io/cluster")
    return wanted if wanted in k["clusters"] else None


def pod_templates(spec: dict) -> list[tuple[str, str, dict]]:
    """(group, node type, pod template) of a RayClusterSpec: the head and every worker group."""
    return ([("headgroup", "head", spec["headGroupSpec"]["template"])]
            + [(g["groupName"], "worker", g["template"]) for g in spec.get("workerGroupSpecs", [])])


def instance_type(template: dict) -> str:
    return template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]


def check_pod_template(where: str, template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: template.spec.containers is empty"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container lacks name or image"
    return containers


def test_kuberay_manifests_have_required_fields():
    kinds = {d["kind"] for p in KUBERAY.glob("*.yaml") for d in load_docs(p)}
    assert {"RayCluster", "RayJob", "RayCronJob", "ServiceAccount", "NetworkPolicy"} <= kinds
    for p in sorted(KUBERAY.glob("*.yaml")):
        for d in load_docs(p):
            assert d.get("apiVersion") and d.get("kind"), p.name
            meta = d.get("metadata", {})
            assert meta.get("name") or meta.get("generateName"), f"{p.name}: metadata.name"
            assert "namespace" not in meta, f"{p.name}: all objects go to the namespace they are applied to"
            if d["apiVersion"].startswith("ray.io/"):
                assert d["apiVersion"] == "ray.io/v1", p.name
            if d["kind"] == "NetworkPolicy":
                assert d["apiVersion"] == "networking.k8s.io/v1", p.name
    for name, (where, spec) in cluster_specs(kuberay()).items():
        for field in HEAD_REQUIRED:
            assert field in spec["headGroupSpec"], f"{where}: headGroupSpec.{field}"
        check_pod_template(f"{where} head", spec["headGroupSpec"]["template"])
        for g in spec["workerGroupSpecs"]:
            for field in WORKER_REQUIRED:
                assert field in g, f"{where}: workerGroupSpecs[{g.get('groupName')}].{field}"
            check_pod_template(f"{where} {g['groupName']}", g["template"])
    for name, d in manifests("RayCronJob"):
        for field in CRONJOB_REQUIRED:
            assert field in d["spec"], f"{name}: spec.{field}"
        assert len(d["spec"]["schedule"].split()) == 5, f"{name}: schedule is not a 5-field cron"
    for name, spec in rayjob_specs():
        assert spec.get("entrypoint"), f"{name}: entrypoint"
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), \
            f"{name}: give exactly one of clusterSelector / rayClusterSpec"
        if "rayClusterSpec" in spec:
            # A cluster made for one job must go with it, or its GPU nodes outlive the run.
            assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: shutdownAfterJobFinishes"


def test_kuberay_cluster_resources_security_and_pins():
    import ray

    selectors = []
    for name, (where, spec) in cluster_specs(kuberay()).items():
        assert spec["rayVersion"] == ray.__version__, where
        assert spec["authOptions"]["mode"] == "token", where
        assert spec["authOptions"].get("secretName"), f"{where}: the token comes from a Secret"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must run no tasks"
        for group_name, _, tpl in pod_templates(spec):
            instance = instance_type(tpl)
            vcpu, ram_gib, gpus = INSTANCES[instance]
            selectors.append(instance)
            assert tpl["spec"].get("serviceAccountName"), f"{where} {group_name}: S3 via IRSA service account"
            for c in check_pod_template(group_name, tpl):
                req = c["resources"]["requests"]
                assert float(req["cpu"]) < vcpu, f"{group_name}: {req['cpu']} CPU won't fit {instance}"
                assert int(str(req["memory"]).removesuffix("Gi")) < ram_gib, f"{group_name}: memory > {instance}"
                assert int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) == gpus, \
                    f"{group_name}: GPU limit != GPUs of {instance} (one scoring actor per T4)"
                assert not image_pin_problems([(group_name, c["image"])]), f"unpinned image {c['image']}"
                tag = DIGEST_PIN.match(c["image"])["name"].rpartition(":")[2]
                assert ray.__version__ in tag, f"image tag {tag} should name the Ray version"
            if gpus:
                assert any(t.get("key") == "nvidia.com/gpu" for t in tpl["spec"]["tolerations"])
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] == 0, f"{where}: {g['groupName']} must scale from zero"
    assert {"g4dn.xlarge", "g5.2xlarge"} <= set(selectors)
    # No public exposure anywhere in cluster/ (the data, not the comments that explain it).
    text = "\n".join(yaml.safe_dump_all(load_docs(p)) for p in YAML_FILES)
    for exposed in ("LoadBalancer", "NodePort", "0.0.0.0/0", "enableIngress: true"):
        assert exposed not in text, exposed


def test_rayjobs_use_the_same_env_as_runtime_env():
    env_vars = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
    k = kuberay()
    for name, spec in rayjob_specs():
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == env_vars, name
        assert job_cluster(k, name, spec), f"{name}: its clusterSelector matches no RayCluster here"


# --- Images: every one pinned by digest ---------------------------------------------------------

# name[:tag]@sha256:<64 lowercase hex>. A tag alone can be re-pushed to other bytes; the digest can't.
DIGEST_PIN = re.compile(r"^(?P<name>[^\s@]+)@sha256:[0-9a-f]{64}$")
DOCKER_IMAGE_KEYS = ("image", "head_image", "worker_image")     # the launcher's docker section


def walk_images(node, where: str) -> list[tuple[str, str]]:
    """(where, image) for every `image` value anywhere in a parsed YAML document: containers,
    initContainers, autoscalerOptions, the launcher's docker (and per node type) images."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in DOCKER_IMAGE_KEYS and isinstance(value, str):
                found.append((f"{where}.{key}", value))
            else:
                found += walk_images(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += walk_images(value, f"{where}[{i}]")
    return found


def dockerfile_images(text: str, where: str) -> list[tuple[str, str]]:
    """The image of every FROM (not a FROM of an earlier build stage)."""
    stages, found = set(), []
    for line in text.splitlines():
        m = re.match(r"\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, flags=re.I)
        if m:
            if m.group(1) not in stages:
                found.append((f"{where} FROM", m.group(1)))
            if m.group(2):
                stages.add(m.group(2))
    return found


def cluster_images() -> list[tuple[str, str]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")) + [CLUSTER / "aws.yaml"]:
        for i, d in enumerate(load_docs(path)):
            found += walk_images(d, f"{path.relative_to(CLUSTER)}[{i}]")
    return found + dockerfile_images((CLUSTER / "Dockerfile").read_text(), "Dockerfile")


def image_pin_problems(images: list[tuple[str, str]]) -> list[str]:
    return [f"{where}: {image!r} is not pinned by digest (name[:tag]@sha256:<64 hex>)"
            for where, image in images if not DIGEST_PIN.match(image)]


def test_every_image_is_pinned_by_digest():
    import ray

    images = cluster_images()
    where = {w.split("[")[0].split(" ")[0] for w, _ in images}
    # Found where they are: both KubeRay clusters, the launcher, the Dockerfile's base.
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "aws.yaml", "Dockerfile"} <= where, where
    assert len(images) >= 6, images
    problems = image_pin_problems(images)
    assert not problems, "\n".join(problems)
    # The base image: the Ray of pyproject's pin, the same digest for the launcher and the Dockerfile.
    bases = {image for w, image in images if w.startswith(("aws.yaml", "Dockerfile"))}
    assert len(bases) == 1, f"cluster/aws.yaml and cluster/Dockerfile must pin the same base image: {bases}"
    assert next(iter(bases)).startswith(f"rayproject/ray:{ray.__version__}-py311-gpu@sha256:"), bases


def test_image_pin_check_can_fail():
    """The check above is real: tags, short or malformed digests, and images hidden in unusual
    places (an initContainer, a per-node-type docker image, a later FROM) are all caught."""
    digest = "0123456789abcdef" * 4
    assert not image_pin_problems([("ok", f"r/ledger-clf:1@sha256:{digest}"), ("ok", f"rayproject/ray@sha256:{digest}")])
    for bad in ("rayproject/ray:2.60.0-py311-gpu", "r/ledger-clf:latest", "r/ledger-clf",
                f"r/ledger-clf@sha256:{digest[:63]}", f"r/ledger-clf@sha256:{digest.upper()}",
                f"r/ledger-clf@sha512:{digest}{digest}", f"r/ledger-clf@sha256:{digest} "):
        assert image_pin_problems([("bad", bad)]), bad
    pod = {"spec": {"initContainers": [{"name": "fetch", "image": "busybox:1.36"}],
                    "containers": [{"name": "ray", "image": f"r/x@sha256:{digest}"}]}}
    assert [img for _, img in walk_images(pod, "pod")] == ["busybox:1.36", f"r/x@sha256:{digest}"]
    launcher = {"docker": {"image": f"r/x@sha256:{digest}"},
                "available_node_types": {"t4": {"docker": {"worker_image": "rayproject/ray:2.60.0-gpu"}}}}
    assert image_pin_problems(walk_images(launcher, "aws.yaml")), "a per-node-type image must be checked too"
    dockerfile = (f"FROM rayproject/ray@sha256:{digest} AS build\nRUN true\n"
                  "FROM build\nFROM python:3.11-slim\n")
    assert [img for _, img in dockerfile_images(dockerfile, "D")] == [f"rayproject/ray@sha256:{digest}", "python:3.11-slim"]
    assert image_pin_problems(dockerfile_images(dockerfile, "D"))


# --- Network: only the operator and the cluster's own pods reach a Ray pod ----------------------

# The KubeRay operator as cluster/README.md installs it (helm chart kuberay-operator, namespace
# kuberay-system). The chart labels its pods app.kubernetes.io/name and .../component with the
# chart name and .../instance with the release name (helm-chart/kuberay-operator/templates/
# deployment.yaml); Kubernetes labels each namespace kubernetes.io/metadata.name: <name>.
APP_NAMESPACE = "default"
OPERATOR = {"name": "the KubeRay operator", "namespace": "kuberay-system",
            "labels": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                       "app.kubernetes.io/component": "kuberay-operator"}}
DASHBOARD_PORT = 8265
# Ports the Ray pods listen on: GCS, client, dashboard, metrics, dashboard agent, a worker's.
RAY_PORTS = (6379, 10001, DASHBOARD_PORT, 8080, 52365, 23456)
# Who must be refused: anything else in the namespace, in the operator's namespace, elsewhere in
# the cluster, an impostor wearing the operator's label in the wrong namespace, and addresses
# outside the pod network (nodes, the VPC, the internet: what an ipBlock or an empty `from` admits).
OUTSIDERS = [
    {"name": "an unlabeled pod of the namespace", "namespace": APP_NAMESPACE, "labels": {}},
    {"name": "a pod with the operator's label outside its namespace", "namespace": APP_NAMESPACE,
     "labels": dict(OPERATOR["labels"])},
    {"name": "another pod of the operator's namespace", "namespace": OPERATOR["namespace"],
     "labels": {"app.kubernetes.io/name": "something-else"}},
    {"name": "a pod of another namespace", "namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}},
    {"name": "an address outside the pod network", "namespace": None, "labels": {}},
]


def ray_pods(k: dict) -> list[dict]:
    """Every Ray pod the manifests make, with the labels it will carry: its template's plus what
    KubeRay adds (ray.io/cluster, ray.io/node-type, ray.io/group, ray.io/is-ray-node)."""
    pods = []
    for cluster, (where, spec) in cluster_specs(k).items():
        for group, node_type, tpl in pod_templates(spec):
            labels = {**(tpl.get("metadata", {}).get("labels") or {}),
                      "ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group,
                      "ray.io/is-ray-node": "yes"}
            pods.append({"name": f"{where} {group}", "cluster": cluster, "node_type": node_type,
                         "namespace": APP_NAMESPACE, "labels": labels})
    return pods


def selects(selector: dict, labels: dict) -> bool:
    """A label selector given as matchLabels (the only form this checker reads, so it can't misread one)."""
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: use matchLabels only"
    return all(labels.get(key) == str(value) for key, value in (selector.get("matchLabels") or {}).items())


def peer_admits(peer: dict, source: dict) -> bool:
    """NetworkPolicyPeer semantics: an ipBlock admits addresses, not pods; podSelector alone means
    pods of the policy's namespace; namespaceSelector with podSelector (one peer) means both."""
    if "ipBlock" in peer:
        return source["namespace"] is None
    if source["namespace"] is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source["namespace"]}):
            return False
    elif source["namespace"] != APP_NAMESPACE:
        return False
    return selects(peer.get("podSelector") or {}, source["labels"])


def isolating(policies: list[dict], pod: dict) -> list[dict]:
    """The ingress policies that select `pod` (a pod no policy selects accepts everything)."""
    return [p for p in policies
            if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], pod["labels"])]


def admitted(policies: list[dict], pod: dict, source: dict, port: int) -> bool:
    chosen = isolating(policies, pod)
    if not chosen:
        return True
    for policy in chosen:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports") or []
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
                continue
            if not rule.get("from") or any(peer_admits(peer, source) for peer in rule["from"]):
                return True
    return False


def network_problems(k: dict) -> list[str]:
    """What is wrong with the NetworkPolicies for the Ray pods of the manifests: a pod left open,
    an ingress rule open to all (no `from`) or to addresses (ipBlock), a source let in that should
    not be, or traffic Ray needs (its own pods on every port, the operator on the head's 8265)
    refused."""
    problems = []
    for policy in k["policies"]:
        for i, rule in enumerate(policy["spec"].get("ingress") or []):
            if not rule.get("from"):
                problems.append(f"{policy['metadata']['name']}: ingress[{i}] has no `from`: everyone is let in")
            for peer in rule.get("from") or []:
                if "ipBlock" in peer:
                    problems.append(f"{policy['metadata']['name']}: ingress[{i}] admits addresses {peer['ipBlock']}")
    pods = ray_pods(k)
    for pod in pods:
        if not isolating(k["policies"], pod):
            problems.append(f"{pod['name']}: no NetworkPolicy selects it, so every source reaches it")
            continue
        for port in RAY_PORTS:
            for peer in pods:
                if peer["cluster"] == pod["cluster"] and not admitted(k["policies"], pod, peer, port):
                    problems.append(f"{pod['name']}: refuses {peer['name']} (same Ray cluster) on {port}")
                if peer["cluster"] != pod["cluster"] and admitted(k["policies"], pod, peer, port):
                    problems.append(f"{pod['name']}: admits {peer['name']} (another Ray cluster) on {port}")
            for outsider in OUTSIDERS:
                if admitted(k["policies"], pod, outsider, port):
                    problems.append(f"{pod['name']}: admits {outsider['name']} on {port}")
            operator_needed = pod["node_type"] == "head" and port == DASHBOARD_PORT
            if admitted(k["policies"], pod, OPERATOR, port) != operator_needed:
                problems.append(f"{pod['name']}: {'refuses' if operator_needed else 'admits'} the operator on {port}")
    return problems


def test_network_policy_admits_only_the_operator_and_the_clusters_own_pods():
    k = kuberay()
    assert k["policies"], "cluster/kuberay/networkpolicy.yaml defines no NetworkPolicy"
    assert {p["cluster"] for p in ray_pods(k)} >= {"ledger-clf"}
    # The labeling cluster's pods are selected by the labels KubeRay sets.
    assert any(p["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": "ledger-clf"}} for p in k["policies"])
    problems = network_problems(k)
    assert not problems, "\n".join(problems)
    # The operator is installed where the policy expects it.
    readme = (CLUSTER / "README.md").read_text()
    install = re.search(r"helm install kuberay-operator .*", readme.replace("\\\n", " "))
    assert install and f"--namespace {OPERATOR['namespace']}" in install.group(0), \
        "cluster/README.md must install the operator in the namespace networkpolicy.yaml admits"


def _operator_rule(k: dict, policy: str) -> dict:
    (p,) = [p for p in k["policies"] if p["metadata"]["name"] == policy]
    return p["spec"]["ingress"][0]


NETWORK_BREAKS = {
    "empty-from": lambda k: _operator_rule(k, "ledger-clf-ray-head-operator").pop("from"),
    "ipblock": lambda k: _operator_rule(k, "ledger-clf-ray-head-operator")["from"].append(
        {"ipBlock": {"cidr": "10.0.0.0/8"}}),
    "operator-any-port": lambda k: _operator_rule(k, "ledger-clf-ray-head-operator").pop("ports"),
    "operator-label-only": lambda k: _operator_rule(k, "ledger-clf-train-ray-head-operator")["from"][0].pop(
        "namespaceSelector"),
    # The classic slip: namespaceSelector and podSelector as two peers (either) instead of one (both).
    "operator-two-peers": lambda k: _operator_rule(k, "ledger-clf-ray-head-operator").update(
        {"from": [{"namespaceSelector": _operator_rule(k, "ledger-clf-ray-head-operator")["from"][0]["namespaceSelector"]},
                  {"podSelector": _operator_rule(k, "ledger-clf-ray-head-operator")["from"][0]["podSelector"]}]}),
    "all-pods-of-namespace": lambda k: _operator_rule(k, "ledger-clf-ray-peers")["from"].append({"podSelector": {}}),
    "other-cluster": lambda k: _operator_rule(k, "ledger-clf-train-ray-peers")["from"][0]["podSelector"]["matchLabels"].pop(
        "app.kubernetes.io/component"),
    "no-peer-policy": lambda k: k["policies"].remove(
        next(p for p in k["policies"] if p["metadata"]["name"] == "ledger-clf-train-ray-peers")),
    "no-operator-policy": lambda k: k["policies"].remove(
        next(p for p in k["policies"] if p["metadata"]["name"] == "ledger-clf-ray-head-operator")),
    "unlabeled-training-pods": lambda k: k["jobs"]["rayjob-train.yaml"]["rayClusterSpec"]["workerGroupSpecs"][0][
        "template"]["metadata"]["labels"].pop("app.kubernetes.io/component"),
}


@pytest.mark.parametrize("change", sorted(NETWORK_BREAKS))
def test_network_policy_check_can_fail(change):
    """The check above is real: each of these broken policies (or pods) fails it."""
    k = copy.deepcopy(kuberay())
    assert not network_problems(k)
    NETWORK_BREAKS[change](k)
    assert network_problems(k), change


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


def job_parser(module: str) -> argparse.ArgumentParser:
    """The job's own parser: `build_parser` of the module `python -m` runs, or for a package
    (jobs.bench) of its settings module."""
    job = importlib.import_module(module)
    if not hasattr(job, "build_parser"):
        job = importlib.import_module(module + ".settings")
    return job.build_parser()


def parse(source, module, argv):
    parser = job_parser(module)
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{source}: `python -m {module} {shlex.join(argv)}` is rejected by "
                    f"{module}.build_parser() (exit {e.code}; abbreviated flags are refused); "
                    f"fix the command or the flag name")


JOB_MODULES = sorted({module for _, module, _ in ENTRYPOINTS} | {"jobs.demo", "jobs.prequantize", "jobs.review",
                                                                  "jobs.promote", "jobs.table", "jobs.bench"})


@pytest.mark.parametrize("module", JOB_MODULES)
def test_every_job_refuses_an_abbreviated_flag(module):
    """argparse would take `--output` for `--output-table` (a removed flag for another): every job's
    parser, and each of its subcommands, refuses a flag cut short."""
    parser = job_parser(module)
    parsers = [parser] + [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    for each in parsers:
        for action in each._actions:
            action.required = False          # a fresh parser: only the abbreviation is looked at
        for action in each._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and len(flag) > 6 and flag != "--help":
                    _, unknown = each.parse_known_args([flag[:-2]] + ([] if action.nargs == 0 else ["x"]))
                    assert flag[:-2] in unknown, f"{module}: {flag[:-2]} was taken for {flag}"


def test_parse_refuses_a_removed_flag():
    """The check above is real: the labeling jobs' old `--output` flag fails it."""
    argv = ["--model", "s3://b/m", "--input", "s3://b/l", "--output", "s3://b/labeled"]
    with pytest.raises(pytest.fail.Exception, match="rejected"):
        parse("test", "jobs.label", argv)


def test_entrypoints_ask_for_the_gpus_the_cluster_has():
    """Scoring: one actor per T4, no more actors than T4 nodes; training: GPU workers that fit."""
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    groups = {g["groupName"]: g for _, spec in cluster_specs(kuberay()).values() for g in spec["workerGroupSpecs"]}
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


# --- Identities: training and labeling never share a service account ----------------------------

TRAIN_JOBS = ("jobs.train",)
ROLE_ARN = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@-]+$")
# What decides a cluster's kind: the GPU it has. Training runs on A10G (bf16), labeling on T4.
KIND_OF_INSTANCE = {"g5.2xlarge": "training", "g4dn.xlarge": "labeling"}


def job_module(job: dict) -> str:
    m = JOB_RE.search(" ".join(job["entrypoint"].split()))
    assert m, job["entrypoint"]
    return m.group(1)


def identity_problems(k: dict) -> list[str]:
    """Every Ray cluster runs under one service account (Ray may place any of its jobs' tasks on any
    of its pods), defined in serviceaccount.yaml with its own IRSA role; training runs only on a
    cluster with training GPUs and labeling only on one with scoring GPUs, never the same cluster,
    never the same account; worker pods get no Kubernetes API token."""
    problems = []
    roles = {}
    for sa in k["accounts"]:
        role = (sa["metadata"].get("annotations") or {}).get("eks.amazonaws.com/role-arn", "")
        if not ROLE_ARN.match(role):
            problems.append(f"service account {sa['metadata']['name']}: no IRSA role (eks.amazonaws.com/role-arn)")
        roles[sa["metadata"]["name"]] = role
    if len(set(roles.values())) != len(roles):
        problems.append(f"two service accounts share an IAM role: {roles}")
    account_of, kind_of = {}, {}
    for cluster, (where, spec) in cluster_specs(k).items():
        accounts = set()
        for group, node_type, tpl in pod_templates(spec):
            sa = tpl["spec"].get("serviceAccountName")
            if sa not in roles:
                problems.append(f"{where} {group}: service account {sa!r} is not one of "
                                f"serviceaccount.yaml's {sorted(roles)}")
            accounts.add(sa)
            if node_type == "worker" and tpl["spec"].get("automountServiceAccountToken") is not False:
                problems.append(f"{where} {group}: set automountServiceAccountToken: false (workers need no Kubernetes API)")
        if len(accounts) != 1:
            problems.append(f"{where}: its pods run under {sorted(map(str, accounts))}; one cluster, one identity")
        account_of[cluster] = next(iter(accounts)) if len(accounts) == 1 else None
        kinds = {KIND_OF_INSTANCE.get(instance_type(tpl)) for _, node_type, tpl in pod_templates(spec)
                 if node_type == "worker"} - {None}
        if len(kinds) != 1:
            problems.append(f"{where}: worker groups of kinds {sorted(kinds)}; training and labeling need "
                            f"clusters of their own")
        kind_of[cluster] = next(iter(kinds)) if len(kinds) == 1 else None
    used = {}
    for source, job in k["jobs"].items():
        cluster = job_cluster(k, source, job)
        want = "training" if job_module(job) in TRAIN_JOBS else "labeling"
        if cluster is None:
            problems.append(f"{source}: runs on no cluster defined here")
        elif kind_of.get(cluster) != want:
            problems.append(f"{source}: {job_module(job)} runs on {cluster}, a {kind_of.get(cluster) or 'mixed'} "
                            f"cluster, not a {want} one")
        else:
            used.setdefault(want, set()).add(account_of[cluster])
    if set(used) != {"training", "labeling"}:
        problems.append(f"the jobs should include both training and labeling: {sorted(used)}")
    elif used["training"] & used["labeling"]:
        shared = sorted(map(str, used["training"] & used["labeling"]))
        problems.append(f"training and labeling share service account(s) {shared}")
    return problems


def test_training_and_labeling_run_under_separate_identities():
    k = kuberay()
    problems = identity_problems(k)
    assert not problems, "\n".join(problems)
    # And concretely: the training RayJob's groups and the labeling cluster's use these accounts.
    train = k["jobs"]["rayjob-train.yaml"]["rayClusterSpec"]
    groups = {g["groupName"]: g["template"]["spec"]["serviceAccountName"] for g in train["workerGroupSpecs"]}
    groups.update({g["groupName"]: g["template"]["spec"]["serviceAccountName"]
                   for g in k["clusters"]["ledger-clf"]["workerGroupSpecs"]})
    assert groups == {"a10g-training": "ledger-clf-train", "t4-scoring": "ledger-clf-label"}, groups
    for source, job in k["jobs"].items():
        if job_module(job) in TRAIN_JOBS:
            assert "rayClusterSpec" in job, f"{source}: training runs on its own cluster"
        else:
            assert job["clusterSelector"] == {"ray.io/cluster": "ledger-clf"}, source


def _worker_group(spec: dict, name: str) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def _train_on_labeling_cluster(k: dict) -> None:
    job = k["jobs"]["rayjob-train.yaml"]
    del job["rayClusterSpec"]
    job["clusterSelector"] = {"ray.io/cluster": "ledger-clf"}


def _one_account(k: dict) -> None:
    for _, _, tpl in pod_templates(k["jobs"]["rayjob-train.yaml"]["rayClusterSpec"]):
        tpl["spec"]["serviceAccountName"] = "ledger-clf-label"


IDENTITY_BREAKS = {
    # the training group under the labeling account: its cluster now mixes identities
    "mixed-cluster": lambda k: _worker_group(k["jobs"]["rayjob-train.yaml"]["rayClusterSpec"], "a10g-training")[
        "template"]["spec"].update(serviceAccountName="ledger-clf-label"),
    # both clusters under one account
    "one-account": _one_account,
    "shared-role": lambda k: k["accounts"][1]["metadata"]["annotations"].update(
        {"eks.amazonaws.com/role-arn": k["accounts"][0]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]}),
    "no-role": lambda k: k["accounts"][0]["metadata"].pop("annotations"),
    "undefined-account": lambda k: _worker_group(k["clusters"]["ledger-clf"], "t4-scoring")["template"]["spec"].update(
        serviceAccountName="ledger-clf-ray"),
    # training submitted to the labeling cluster
    "train-on-labeling-cluster": _train_on_labeling_cluster,
    # the old layout: the A10G group back in the labeling cluster
    "both-kinds-in-one-cluster": lambda k: k["clusters"]["ledger-clf"]["workerGroupSpecs"].append(
        copy.deepcopy(_worker_group(k["jobs"]["rayjob-train.yaml"]["rayClusterSpec"], "a10g-training"))),
    "worker-api-token": lambda k: _worker_group(k["clusters"]["ledger-clf"], "t4-scoring")["template"]["spec"].pop(
        "automountServiceAccountToken"),
}


@pytest.mark.parametrize("change", sorted(IDENTITY_BREAKS))
def test_identity_check_can_fail(change):
    """The check above is real: each of these broken layouts fails it."""
    k = copy.deepcopy(kuberay())
    assert not identity_problems(k)
    IDENTITY_BREAKS[change](k)
    assert identity_problems(k), change


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
    from clf_core.labeling.settings import LabelSettings
    from clf_core.settings import from_args

    args = parse(source, module, argv)
    try:
        settings = from_args(LabelSettings, args).validate()
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


def test_cluster_jobs_score_with_the_champion_and_training_publishes_into_the_registry():
    """The cron and backfill jobs take the model the gate promoted (REGISTRY/NAME@champion), apply
    the reviewers' answers, and training publishes versions that only a promotion makes live."""
    on_cluster = [(s, m, parse(s, m, a)) for s, m, a in ON_CLUSTER]
    manifests_of = {name for name, _ in manifests("RayCronJob")} | {name for name, _ in manifests("RayJob")}
    for source, module, args in on_cluster:
        if module in LABEL_JOBS and source in manifests_of:
            assert args.model.endswith("@champion"), f"{source}: --model {args.model} is not the champion alias"
            assert args.corrections, f"{source}: the cluster's label jobs apply the reviewers' answers (--corrections)"
        if module == "jobs.train":
            assert args.registry.startswith("s3://") and args.name and not args.output, \
                f"{source}: training publishes into the registry (--registry/--name), not to a fixed --output"
    assert {m for _, m, _ in on_cluster} >= {"jobs.promote"}, "the README shows how a promotion is submitted"


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
    from clf_core.catalog import open_catalog

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
