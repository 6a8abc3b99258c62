#!/usr/bin/env python3
"""Static checks of deploy/: every YAML document parses, the Kubernetes
manifests and the compose file have what a deployment needs, and their
ports, probes, images, secret paths and embedded recvault.toml agree with
each other and with `recvault config check`.

    python3 scripts/check_deploy.py --recvault target/debug/recvault

No image is built or pulled (CI has no registry access); the Dockerfile is
checked as text. Exit status 1 with one line per problem.
"""

import argparse
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LABEL = {"app.kubernetes.io/name": "recvault"}

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def load_yaml(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        problem(path.relative_to(ROOT), f"YAML does not parse: {e}".replace("\n", " "))
        return []


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def config_check(recvault, toml_text, where, env=None):
    """Runs `recvault config check --skip-files` on the text; returns the
    effective configuration it prints, parsed."""
    tmp = ROOT / "target" / "check_deploy.toml"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(toml_text)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("RECVAULT")}
    run_env.update(env or {})
    out = subprocess.run(
        [recvault, "config", "check", "--skip-files", "--config", str(tmp)],
        capture_output=True,
        text=True,
        env=run_env,
    )
    if out.returncode != 0:
        problem(where, f"recvault config check refuses it: {out.stderr.strip()}")
        return None
    return tomllib.loads(out.stdout)


def check_secret_paths(cfg, mounted_dirs, where):
    """Every *_file the config names lies in a directory the container mounts."""
    files = []
    for section in cfg.values():
        if isinstance(section, dict):
            files += [v for k, v in section.items() if k.endswith("_file") and isinstance(v, str)]
    for f in files:
        if not any(f.startswith(d.rstrip("/") + "/") for d in mounted_dirs):
            problem(where, f"config names {f}, which no mounted secret directory holds")


def check_k8s(recvault):
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path, d) for d in load_yaml(path)]
    by_kind = {}
    for path, d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            problem(path.relative_to(ROOT), "a document without kind/apiVersion")
            continue
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ["Deployment", "Service", "ConfigMap", "PodDisruptionBudget"]:
        if len(by_kind.get(kind, [])) != 1:
            problem("deploy/k8s", f"expected one {kind}, found {len(by_kind.get(kind, []))}")
    if problems:
        return
    dep, svc, cm, pdb = (by_kind[k][0] for k in ["Deployment", "Service", "ConfigMap", "PodDisruptionBudget"])
    where = "deploy/k8s/deployment.yaml"
    spec = dep["spec"]
    if spec.get("replicas") != 2:
        problem(where, f"replicas is {spec.get('replicas')}, expected 2")
    pod_labels = spec["template"]["metadata"]["labels"]
    for name, selector in [
        ("Deployment", spec["selector"]["matchLabels"]),
        ("Service", svc["spec"]["selector"]),
        ("PodDisruptionBudget", pdb["spec"]["selector"]["matchLabels"]),
    ]:
        if selector != LABEL or any(pod_labels.get(k) != v for k, v in selector.items()):
            problem(where, f"the {name} selector {selector} does not select the pods {pod_labels}")
    if pdb["spec"].get("minAvailable") != 1:
        problem("deploy/k8s/pdb.yaml", "minAvailable should be 1 of the 2 replicas")

    pod = spec["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    c = containers.get("recvault")
    if c is None:
        problem(where, "no container named recvault")
        return
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    for ct in pod["containers"] + pod.get("initContainers", []):
        if ct["image"] != f"recvault:{version}":
            problem(where, f"container {ct['name']} runs {ct['image']}, expected recvault:{version} (Cargo.toml)")

    # The embedded config, with the container's plain env on top, is what
    # recvault accepts; its ports are the container's.
    toml_text = cm["data"].get("recvault.toml")
    if toml_text is None:
        problem("deploy/k8s/configmap.yaml", "no recvault.toml key")
        return
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    cfg = config_check(recvault, toml_text, "deploy/k8s/configmap.yaml", env)
    if cfg is None:
        return
    if cfg["catalog"]["backend"] != "postgres" or cfg["storage"]["backend"] != "s3":
        problem("deploy/k8s/configmap.yaml", "replicas need catalog.backend = postgres and storage.backend = s3")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    want = {"grpc": port_of(cfg["listen"]), "http": port_of(cfg["http"]["listen"])}
    if ports != want:
        problem(where, f"container ports {ports} differ from the config's listen addresses {want}")
    for sp in svc["spec"]["ports"]:
        if sp["targetPort"] not in ports and sp["targetPort"] not in ports.values():
            problem("deploy/k8s/service.yaml", f"port {sp['name']} targets {sp['targetPort']}, not a container port")
    if not cfg["http"]["enabled"]:
        problem("deploy/k8s/configmap.yaml", "probes use the HTTP port, which the config disables")
    scheme = "HTTPS" if "tls" in cfg else "HTTP"
    paths = {"startupProbe": "/live", "livenessProbe": "/live", "readinessProbe": "/ready"}
    for probe, path in paths.items():
        p = c.get(probe)
        if p is None:
            problem(where, f"no {probe}")
            continue
        get = p.get("httpGet")
        if get is not None:
            if get.get("path") != path:
                problem(where, f"{probe} asks {get.get('path')}, expected {path}")
            if get.get("port") not in ("http", want["http"]):
                problem(where, f"{probe} port {get.get('port')} is not the HTTP port {want['http']}")
            if get.get("scheme", "HTTP") != scheme:
                problem(where, f"{probe} scheme {get.get('scheme', 'HTTP')}, but the HTTP port speaks {scheme}")
        elif "grpc" in p:
            if p["grpc"].get("port") != want["grpc"]:
                problem(where, f"{probe} gRPC port {p['grpc'].get('port')} is not {want['grpc']}")
            if "tls" in cfg:
                problem(where, f"{probe}: Kubernetes' gRPC probe speaks plaintext, the gRPC port TLS")
        else:
            problem(where, f"{probe} is neither httpGet nor grpc")
    timeout = c["readinessProbe"].get("timeoutSeconds", 1)
    probe_timeout = cfg["health"]["probe_timeout"]
    if not re.fullmatch(r"\d+s", probe_timeout) or int(probe_timeout[:-1]) >= timeout:
        problem(where, f"readinessProbe.timeoutSeconds {timeout} must exceed health.probe_timeout {probe_timeout}")

    # Secrets: referenced Secrets exist as volumes, and every file the config
    # names sits in a directory the container mounts.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for m in c["volumeMounts"]:
        if m["name"] not in volumes:
            problem(where, f"mount {m['mountPath']} names no volume {m['name']}")
    check_secret_paths(cfg, list(mounts), "deploy/k8s/configmap.yaml")
    secret_names = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    readme = (DEPLOY / "README.md").read_text()
    for s in sorted(secret_names):
        if s not in readme:
            problem("deploy/README.md", f"does not say how to create Secret {s}")
    if "/etc/recvault" not in mounts or volumes[mounts["/etc/recvault"]].get("configMap", {}).get("name") != cm[
        "metadata"
    ]["name"]:
        problem(where, "the ConfigMap is not mounted at /etc/recvault")
    sc = c.get("securityContext", {})
    if not sc.get("runAsNonRoot") or sc.get("allowPrivilegeEscalation") is not False:
        problem(where, "recvault must run as non-root without privilege escalation")


def check_compose(recvault):
    path = DEPLOY / "compose.yaml"
    docs = load_yaml(path)
    if len(docs) != 1:
        problem("deploy/compose.yaml", "expected one YAML document")
        return
    services = docs[0].get("services", {})
    replicas = [n for n, s in services.items() if s.get("image", "").startswith("recvault:")]
    if len(replicas) != 2:
        problem("deploy/compose.yaml", f"expected two recvault replicas, found {replicas}")
    for need in ["postgres", "garage", "garage-init"]:
        if need not in services:
            problem("deploy/compose.yaml", f"no {need} service")
    cfg_file = docs[0].get("configs", {}).get("recvault_toml", {}).get("file")
    if cfg_file is None:
        problem("deploy/compose.yaml", "no recvault_toml config")
        return
    cfg = config_check(recvault, (DEPLOY / cfg_file).read_text(), f"deploy/{cfg_file}")
    if cfg is None:
        return
    if cfg["catalog"]["backend"] != "postgres" or cfg["storage"]["backend"] != "s3":
        problem(f"deploy/{cfg_file}", "replicas need catalog.backend = postgres and storage.backend = s3")
    check_secret_paths(cfg, ["/run/secrets"], f"deploy/{cfg_file}")
    grpc, http = port_of(cfg["listen"]), port_of(cfg["http"]["listen"])
    declared = set(docs[0].get("secrets", {}))
    for name in replicas:
        s = services[name]
        inside = sorted(int(p.rsplit(":", 1)[1]) for p in s.get("ports", []))
        if inside != sorted([grpc, http]):
            problem("deploy/compose.yaml", f"{name} publishes container ports {inside}, the config listens on {grpc}, {http}")
        deps = s.get("depends_on", {})
        if deps.get("garage-init", {}).get("condition") != "service_completed_successfully":
            problem("deploy/compose.yaml", f"{name} must wait for garage-init to complete")
        if deps.get("postgres", {}).get("condition") != "service_healthy":
            problem("deploy/compose.yaml", f"{name} must wait for a healthy postgres")
        test = " ".join(s.get("healthcheck", {}).get("test", []))
        if f"/{http}" not in test or "/ready" not in test:
            problem("deploy/compose.yaml", f"{name}'s healthcheck does not ask /ready on port {http}")
        for sec in s.get("secrets", []):
            src = sec if isinstance(sec, str) else sec["source"]
            if src not in declared:
                problem("deploy/compose.yaml", f"{name} uses undeclared secret {src}")
    for sec in ["catalog_url", "s3_access_key_id", "s3_secret_access_key", "root_key", "pg_password"]:
        if sec not in declared:
            problem("deploy/compose.yaml", f"secret {sec} is not declared")
    make = (DEPLOY / "compose" / "make-secrets.sh").read_text()
    for name, sec in docs[0].get("secrets", {}).items():
        if Path(sec["file"]).name not in make:
            problem("deploy/compose/make-secrets.sh", f"does not make {sec['file']} (secret {name})")


def check_dockerfile():
    where = "deploy/Dockerfile"
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    if not stages or stages[-1].lower() != "runtime":
        problem(where, "the last stage (the default image) should be `runtime`")
    if "builder" not in [s.lower() for s in stages]:
        problem(where, "no `builder` stage")
    runtime = text[text.rfind("AS runtime"):]
    user = re.search(r"^USER\s+(\S+)", runtime, re.M)
    if user is None or user.group(1).split(":")[0] in ("0", "root"):
        problem(where, "the runtime stage must end as a non-root USER")
    defaults = tomllib.loads((DEPLOY / "recvault.toml").read_text())
    exposed = sorted(int(p) for p in re.findall(r"^EXPOSE\s+(.+)$", runtime, re.M)[0].split())
    if exposed != sorted([port_of(defaults["listen"]), port_of(defaults["http"]["listen"])]):
        problem(where, f"EXPOSE {exposed} differs from the default ports of deploy/recvault.toml")
    data = re.search(r"^ENV\s+RECVAULT__DATA_DIR=(\S+)", runtime, re.M)
    volume = re.search(r'^VOLUME\s+\["([^"]+)"\]', runtime, re.M)
    if data is None or volume is None or data.group(1) != volume.group(1):
        problem(where, "the data directory (RECVAULT__DATA_DIR) must be the VOLUME")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.M):
        for item in src.split():
            if f"!{item}" not in ignore and f"!{item}/" not in ignore:
                problem("deploy/Dockerfile.dockerignore", f"excludes {item}, which the Dockerfile copies")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recvault", default=str(ROOT / "target" / "debug" / "recvault"))
    args = ap.parse_args()
    if not os.access(args.recvault, os.X_OK):
        print(f"check_deploy: no recvault binary at {args.recvault} (cargo build first)", file=sys.stderr)
        return 1
    for path in sorted(DEPLOY.rglob("*.yaml")):
        load_yaml(path)
    check_k8s(args.recvault)
    check_compose(args.recvault)
    check_dockerfile()
    for p in problems:
        print(f"check_deploy: {p}", file=sys.stderr)
    print(f"check_deploy: {'FAILED' if problems else 'ok'}: {len(problems)} problems in deploy/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
