"""deploy/: linted by hadolint, checkov and yamllint; its server and quantizer arguments parsed by the real parsers.

No Docker engine or cluster runs here, so the images and manifests are checked statically. The
linters come from ``.venv-lint`` (``make test`` builds it from deploy/lint-requirements.txt and
sets KBVQ_LINT_BIN); vLLM's own argument parser is the oracle for every server command line.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"


def _tool(name: str) -> str:
    where = os.environ.get("KBVQ_LINT_BIN")
    path = shutil.which(name, path=where) if where else shutil.which(name)
    if path is None:
        if where:
            pytest.fail(f"{name} is not in KBVQ_LINT_BIN={where}")
        pytest.skip(f"{name} not installed (make test installs it into .venv-lint)")
    return path


def _k8s_docs() -> dict[str, dict]:
    docs = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d and "kind" in d and d["kind"] != "Kustomization":
                docs[f"{d['kind']}/{d['metadata']['name']}"] = d
    return docs


def _container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def _dockerfile_cmd(path: Path) -> list[str]:
    (line,) = [ln for ln in path.read_text().splitlines() if ln.startswith("CMD ")]
    return json.loads(line[4:])


# -- linters -------------------------------------------------------------------------------

def test_there_are_a_gpu_and_a_cpu_dockerfile():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gpu", "Dockerfile.cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    r = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_yamllint():
    files = [str(COMPOSE), *map(str, sorted(K8S.glob("*.yaml")))]
    r = subprocess.run([_tool("yamllint"), "-c", str(DEPLOY / ".yamllint"), "-f", "parsable", *files],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_checkov(tmp_path):
    # --skip-download: no network; the checks ship with the package
    r = subprocess.run([_tool("checkov"), "-d", str(DEPLOY), "--framework", "dockerfile", "kubernetes",
                        "--skip-download", "-o", "json"],
                       capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    reports = json.loads(r.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {rep["check_type"]: rep["results"] for rep in reports}
    summaries = {rep["check_type"]: rep["summary"] for rep in reports}
    assert set(by_type) == {"dockerfile", "kubernetes"}, r.stderr[-2000:]
    failed = [(t, c["check_id"], c["resource"]) for t, res in by_type.items() for c in res["failed_checks"]]
    assert not failed
    for t, summary in summaries.items():
        assert summary["passed"] > 20, t  # it really looked at the files
    skipped = {c["check_id"] for res in by_type.values() for c in res["skipped_checks"]}
    assert skipped <= {"CKV_K8S_43"}  # image digest: the user builds the image


# -- arguments, parsed by the real parsers ---------------------------------------------------

def _vllm_parse(argv: list[str]):
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kbvq.serve import server_argv

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(server_argv(argv))
    validate_parsed_serve_args(args)
    return args


def _serve_command_lines(tmp_path) -> dict[str, list[str]]:
    """Every kbvq-serve command line deploy/ starts, with the ConfigMap's file where the pod mounts it."""
    compose = yaml.safe_load(COMPOSE.read_text())
    docs = _k8s_docs()
    k8s_args = list(_container(docs["Deployment/kbvq"])["args"])
    cm = tmp_path / "serve.yaml"
    cm.write_text(docs["ConfigMap/kbvq-serve"]["data"]["serve.yaml"])
    k8s_args[k8s_args.index("--config") + 1] = str(cm)
    lines = {"compose": [str(a) for a in compose["services"]["kbvq"]["command"]], "k8s": k8s_args}
    lines.update({p.name: _dockerfile_cmd(p) for p in DOCKERFILES})
    return lines


def test_server_arguments_are_accepted_by_vllm(tmp_path):
    lines = _serve_command_lines(tmp_path)
    parsed = {k: _vllm_parse(v) for k, v in lines.items()}
    for name, a in parsed.items():
        assert a.model == "/models/kbvq" and a.quantization == "kbvq", name
        assert a.port == 8000 and a.host == "0.0.0.0", name
    for name in ("compose", "k8s"):
        assert parsed[name].max_model_len == 4096 and parsed[name].gpu_memory_utilization == 0.90
        assert parsed[name].served_model_name == ["kbvq"]


def test_vllm_parser_rejects_what_it_does_not_know(tmp_path):
    with pytest.raises(SystemExit):
        _vllm_parse([*_serve_command_lines(tmp_path)["compose"], "--no-such-vllm-option", "1"])


def test_ports_probes_and_volumes_agree():
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["kbvq"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "/health" in " ".join(compose["services"]["kbvq"]["healthcheck"]["test"])
    docs = _k8s_docs()
    c = _container(docs["Deployment/kbvq"])
    assert c["ports"][0]["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = {v["persistentVolumeClaim"]["claimName"] for d in (docs["Deployment/kbvq"], docs["Job/kbvq-quantize"])
              for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim/kbvq-models"]["metadata"]["name"]}
    assert docs["Service/kbvq"]["spec"]["ports"][0]["port"] == 8000
    for p in DOCKERFILES:
        assert "HEALTHCHECK" in p.read_text() and "/health" in p.read_text()
        assert "\nUSER 10001\n" in p.read_text()  # not root; the manifests' runAsUser
    kustomized = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(kustomized) == sorted(p.name for p in K8S.glob("*.yaml")
                                        if p.name not in ("kustomization.yaml", "quantize-job.yaml"))


def test_quantize_arguments_are_accepted_by_kbvq_quantize():
    from quantize_tools.cli import build_parser

    compose = yaml.safe_load(COMPOSE.read_text())["services"]["quantize"]
    job = _container(_k8s_docs()["Job/kbvq-quantize"])
    assert compose["entrypoint"] == job["command"] == ["kbvq-quantize"]
    for argv in ([str(a) for a in compose["command"]], job["args"]):
        a = build_parser().parse_args(argv)
        assert (str(a.model), str(a.output), a.bits, a.device) == ("/models/source", "/models/kbvq", 2, "cuda")


# -- bad configuration gives a clear message -------------------------------------------------

def _serve(args, **env):
    return subprocess.run([sys.executable, "-m", "vllm_kbvq.serve", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_missing_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "models" / "kbvq"
    r = _serve([str(missing), "--port", "8000"])
    assert r.returncode == 2
    assert f"checkpoint path {missing} does not exist" in r.stderr and "volume" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_image_without_a_gpu_says_so(tmp_path):
    r = _serve([str(tmp_path)], KBVQ_REQUIRE_GPU="1")
    assert r.returncode == 2
    assert "no CUDA device is visible" in r.stderr and "--gpus all" in r.stderr


def test_demo_on_a_busy_port_stops_before_doing_anything(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "quantize_tools.testbed.demo", "--out", str(tmp_path / "out"),
                            "--port", str(port)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert not (tmp_path / "out").exists()


def test_server_process_refuses_a_busy_port(tmp_path):
    from quantize_tools.testbed.server import ServerError, ServerProcess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        srv = ServerProcess(tmp_path, tmp_path / "log", port=s.getsockname()[1])
        with pytest.raises(ServerError, match="already in use"):
            srv.__enter__()
        assert srv.proc is None
