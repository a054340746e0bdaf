#!/usr/bin/env python3
"""check_k8s.py DIR - checks the Kubernetes manifests of DIR (deploy/k8s)
without a cluster or kubectl: every file parses as YAML (PyYAML), every
document has what its kind requires, and the resources agree with each
other (selectors and labels, ports, probes, the HPA's target, the options
the Deployment takes from its ConfigMap, the GPU overlay's patches).
Prints one line per problem and exits 1 when there is any; run by
tests/test_deploy.c."""
import os
import re
import sys

import yaml

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def get(obj, path, default=None):
    """obj's value at a dotted path of keys, or default."""
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def load(path):
    """The documents of one file; each must be a mapping."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("#"):
        problem(path, "does not start with a comment saying what it is for")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        problem(path, f"not YAML: {e}")
        return []
    for d in docs:
        if not isinstance(d, dict):
            problem(path, "a document is not a mapping")
    return [d for d in docs if isinstance(d, dict)]


def check_resource(path, d):
    for key in ("apiVersion", "kind"):
        if not isinstance(d.get(key), str):
            problem(path, f"no {key}")
    if d.get("kind") != "Kustomization" and not isinstance(get(d, "metadata.name"), str):
        problem(path, "no metadata.name")


def matches(selector, labels):
    return isinstance(selector, dict) and selector and isinstance(labels, dict) and all(
        labels.get(k) == v for k, v in selector.items())


def check_deployment(path, d, configmaps):
    labels = get(d, "spec.template.metadata.labels")
    if not matches(get(d, "spec.selector.matchLabels"), labels):
        problem(path, "spec.selector.matchLabels does not match the pod template's labels")
    containers = get(d, "spec.template.spec.containers")
    if not isinstance(containers, list) or not containers:
        problem(path, "no containers")
        return
    for c in containers:
        where = f"{path}: container {c.get('name')}"
        if not c.get("name") or not c.get("image"):
            problem(where, "needs a name and an image")
        args = c.get("args", [])
        if not all(isinstance(a, str) for a in args):
            problem(where, "every argument must be a string")
        # $(VAR) in args comes from env or from the ConfigMaps of envFrom.
        defined = {e.get("name") for e in c.get("env", []) if isinstance(e, dict)}
        for src in c.get("envFrom", []):
            name = get(src, "configMapRef.name")
            if name not in configmaps:
                problem(where, f"envFrom names ConfigMap {name}, which is not here")
            else:
                defined |= set(configmaps[name])
        values = {}
        for src in c.get("envFrom", []):
            values.update(configmaps.get(get(src, "configMapRef.name"), {}))
        for a in args:
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
                if var not in defined:
                    problem(where, f"argument uses $({var}), which nothing defines")
        check_grace(where, d, c, args, values)
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", []) if isinstance(p, dict)}
        if not all(isinstance(v, int) for v in ports.values()) or not ports:
            problem(where, "needs named ports with integer containerPorts")
        for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            got = get(c, f"{probe}.httpGet.path")
            if got != want:
                problem(where, f"{probe} must GET {want}, not {got}")
            port = get(c, f"{probe}.httpGet.port")
            if port not in ports and port not in ports.values():
                problem(where, f"{probe} port {port} is not a port of the container")
        res = c.get("resources", {})
        if not get(res, "requests.cpu") or not get(res, "requests.memory") or not get(res, "limits.memory"):
            problem(where, "needs cpu and memory requests and a memory limit")


# The seconds a server takes after --drain-s to answer the requests it
# cuts off (CUT_OFF_S of server/serve.c).
CUT_OFF_S = 2


def check_grace(where, d, c, args, values):
    """Kubernetes kills a pod its grace period after it begins to stop,
    preStop hook included: the server's drain (--drain-s, 300 s unless
    given) and its cut-off must end before, so that it ends what is left
    itself, telling each client."""
    grace = get(d, "spec.template.spec.terminationGracePeriodSeconds", 30)
    command = get(c, "lifecycle.preStop.exec.command", [])
    pre_stop = int(command[1]) if len(command) == 2 and command[0] == "sleep" and command[1].isdigit() else 0
    drain = "300"
    if "--drain-s" in args[:-1]:
        drain = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: str(values.get(m.group(1), "")),
                       args[args.index("--drain-s") + 1])
    if not drain.isdigit() or not isinstance(grace, int) or pre_stop + int(drain) + CUT_OFF_S >= grace:
        problem(where, f"preStop ({pre_stop} s), --drain-s ({drain} s) and the cut-off ({CUT_OFF_S} s) must end "
                       f"within terminationGracePeriodSeconds ({grace} s)")


def check_configmap(path, d):
    data = d.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        problem(path, "ConfigMap data values must all be strings")


def check_service(path, d, pods):
    sel = get(d, "spec.selector")
    if not any(matches(sel, labels) for labels, _ in pods):
        problem(path, "its selector matches no pod template")
    for p in get(d, "spec.ports", []) or []:
        target = p.get("targetPort", p.get("port"))
        if not any(target in names or target in names.values() for labels, names in pods if matches(sel, labels)):
            problem(path, f"targetPort {target} is no port of the pods it selects")


def check_hpa(path, d, deployments):
    ref = get(d, "spec.scaleTargetRef", {})
    if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
        problem(path, f"scaleTargetRef {ref} is not a Deployment here")
    lo, hi = get(d, "spec.minReplicas", 1), get(d, "spec.maxReplicas")
    if not isinstance(hi, int) or not isinstance(lo, int) or not 1 <= lo <= hi:
        problem(path, "needs 1 <= minReplicas <= maxReplicas")
    if not get(d, "spec.metrics"):
        problem(path, "no metrics")


def check_pdb(path, d, pods):
    if not any(matches(get(d, "spec.selector.matchLabels"), labels) for labels, _ in pods):
        problem(path, "its selector matches no pod template")


def kustomization(folder):
    """The resources (files) a kustomization.yaml lists, loaded."""
    path = os.path.join(folder, "kustomization.yaml")
    if not os.path.exists(path):
        problem(folder, "no kustomization.yaml")
        return None, []
    docs = load(path)
    k = docs[0] if docs else {}
    check_resource(path, k)
    if k.get("kind") != "Kustomization":
        problem(path, "kind is not Kustomization")
    return k, k.get("resources", [])


def main(root):
    k, resources = kustomization(root)
    listed = set()
    docs = []
    for r in resources:
        path = os.path.join(root, r)
        if not os.path.isfile(path):
            problem(root, f"kustomization.yaml lists {r}, which is not a file")
            continue
        listed.add(r)
        for d in load(path):
            check_resource(path, d)
            docs.append((path, d))
    for name in sorted(os.listdir(root)):
        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml" and name not in listed:
            problem(root, f"{name} is not listed in kustomization.yaml")

    configmaps = {get(d, "metadata.name"): d.get("data", {}) for _, d in docs if d.get("kind") == "ConfigMap"}
    deployments = {get(d, "metadata.name"): d for _, d in docs if d.get("kind") == "Deployment"}
    pods = []
    for d in deployments.values():
        names = {}
        for c in get(d, "spec.template.spec.containers", []) or []:
            names.update({p.get("name"): p.get("containerPort") for p in c.get("ports", [])})
        pods.append((get(d, "spec.template.metadata.labels"), names))
    kinds = {d.get("kind") for _, d in docs}
    for want in ("Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"):
        if want not in kinds:
            problem(root, f"no {want}")
    for path, d in docs:
        kind = d.get("kind")
        if kind == "Deployment":
            check_deployment(path, d, configmaps)
        elif kind == "ConfigMap":
            check_configmap(path, d)
        elif kind == "Service":
            check_service(path, d, pods)
        elif kind == "HorizontalPodAutoscaler":
            check_hpa(path, d, deployments)
        elif kind == "PodDisruptionBudget":
            check_pdb(path, d, pods)

    # The GPU overlay: patches of resources of the base, one GPU per pod.
    gpu = os.path.join(root, "gpu")
    gk, gres = kustomization(gpu)
    if gk is not None:
        if not any(os.path.normpath(os.path.join(gpu, r)) == os.path.normpath(root) for r in gres):
            problem(gpu, "the GPU overlay does not build on the base folder")
        gpus = 0
        for p in gk.get("patches", []):
            path = os.path.join(gpu, p.get("path", ""))
            if not os.path.isfile(path):
                problem(gpu, f"patch {p} is not a file")
                continue
            for d in load(path):
                check_resource(path, d)
                name, kind = get(d, "metadata.name"), d.get("kind")
                if not any(get(b, "metadata.name") == name and b.get("kind") == kind for _, b in docs):
                    problem(path, f"patches {kind} {name}, which the base does not have")
                if kind == "ConfigMap":
                    check_configmap(path, d)
                    if get(d, "data.RRN_DEVICE") != "cuda":
                        problem(path, "the GPU variant must set RRN_DEVICE to cuda")
                for c in get(d, "spec.template.spec.containers", []) or []:
                    lim = get(c, "resources.limits", {}) or {}
                    req = get(c, "resources.requests", {}) or {}
                    if lim.get("nvidia.com/gpu") != 1:
                        problem(path, "each container needs limits nvidia.com/gpu: 1")
                    elif req.get("nvidia.com/gpu", 1) != 1:
                        problem(path, "an nvidia.com/gpu request must equal its limit")
                    else:
                        gpus += 1
        if not gpus:
            problem(gpu, "no container asks for a GPU")

    for p in problems:
        print(p)
    print(f"{len(docs)} resource(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "deploy/k8s"))
