"""docker/: the image's files (always checked) and the compose demo end to end (marked `docker`, skipped
when no Docker daemon is reachable: CI need not start one)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
sys.path.insert(0, str(DOCKER))
import entrypoint  # noqa: E402  (docker/entrypoint.py)

SUMMARY = re.compile(r"^summary: secure==plaintext (\d+)/(\d+), accuracy (\d+)/(\d+), median ([\d.]+) s/image$", re.M)


def _pins(lines):
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.lstrip().startswith("#"))


def test_image_requirements_match_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    image = _pins((DOCKER / "requirements.txt").read_text().splitlines())
    pins = _pins(project)
    assert image, "docker/requirements.txt pins nothing"
    for name, version in image.items():
        assert pins.get(name) == version, f"{name}=={version} in docker/requirements.txt, {pins.get(name)} in pyproject"
    assert "matplotlib" not in image  # training only


def test_dockerfile_builds_offline_non_root_with_health_checks():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "PIP_NO_INDEX=1" in text and "COPY wheelhouse/" in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text
    runtime = text.split("# -- runtime")[1]
    assert "wheelhouse" not in runtime and "tests" not in runtime and "demo/images" not in runtime
    assert "ARG PLAN=docker/no-plan" in runtime and (DOCKER / "no-plan").stat().st_size == 0
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*"  # an allow-list: tests, demo/images, .venv stay out of the build context
    assert not any(line.startswith("!") and ("tests" in line or "images" in line) for line in ignore)


def test_compose_services_health_ordering_and_nothing_left_behind():
    doc = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"dealer", "server", "client"}
    assert services["server"]["depends_on"]["dealer"]["condition"] == "service_healthy"
    assert services["client"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert "volumes" not in doc  # bind mounts only: `down` leaves no volume
    # the only two ports, the server's and the dealer's, on the host's loopback; the client publishes none
    assert services["server"]["ports"] == ["127.0.0.1:${PI_SERVER_PORT:-7000}:7000"]
    assert services["dealer"]["ports"] == ["127.0.0.1:${PI_DEALER_PORT:-7001}:7001"]
    assert "ports" not in services["client"]
    for name, svc in services.items():
        assert "DEEPREDUCE_TOKEN" in svc["environment"]
        for mount in svc.get("volumes", []):
            assert mount.endswith(":ro"), mount


def test_entrypoint_errors_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(entrypoint, "HEALTH_FILE", str(tmp_path / "role.json"))
    assert entrypoint.main(["nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown role 'nonsense'") and "\n" not in err
    monkeypatch.setenv("PI_PLAN", str(tmp_path / "missing.plan"))
    assert entrypoint.main(["server"]) == 2
    assert "no plan at" in capsys.readouterr().err
    monkeypatch.setenv("PI_IMAGES", str(tmp_path / "none"))
    assert entrypoint.main(["client"]) == 2
    assert "image folder" in capsys.readouterr().err
    assert entrypoint.main(["health"]) == 2  # nothing started in this "container"
    assert "has not started" in capsys.readouterr().err


def test_demo_images_and_their_labels(tmp_path, monkeypatch):
    """client/images.py, shared by `make demo` and the container's client: image files below a folder,
    sorted, and the true label from the parent folder or a cat_0123.png-style prefix."""
    from client.images import image_files, true_label
    (tmp_path / "dog").mkdir()
    for name in ("cat_0001.png", "dog/0002.JPG", "notes.txt", "x_0003.png"):
        (tmp_path / name).write_bytes(b"")
    paths = image_files(str(tmp_path), hint="pass --images DIR")
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["cat_0001.png", "dog/0002.JPG", "x_0003.png"]
    assert [true_label(p, str(tmp_path), ["cat", "dog"]) for p in paths] == ["cat", "dog", None]
    with pytest.raises(ValueError, match=r"does not exist: pass --images DIR$"):
        image_files(str(tmp_path / "missing"), hint="pass --images DIR")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images .* in .*empty: set \$PI_IMAGES$"):
        image_files(str(tmp_path / "empty"), hint="set $PI_IMAGES")
    monkeypatch.setattr(entrypoint, "HEALTH_FILE", str(tmp_path / "role.json"))
    with pytest.raises(entrypoint.EntryError, match="does not exist: mount one"):
        entrypoint.find_images(str(tmp_path / "missing"))


def test_entrypoint_summary_line_matches_make_demo(capsys):
    paths = ["/d/cat_1.png", "/d/dog_2.png"]
    secure = {"images": [{"class_index": 3, "class_name": "cat", "probability": 0.9},
                         {"class_index": 3, "class_name": "cat", "probability": 0.6}],
              "latency": {"total_s": 8.0, "sessions": 2, "online_s": 1.5, "mb_sent": 1.0, "mb_received": 2.0,
                          "rounds": 10},
              "sessions": [{"total_s": 3.0, "images": 1}, {"total_s": 5.0, "images": 1}]}
    plain = [{"class_index": 3, "class_name": "cat", "probability": 0.9},
             {"class_index": 5, "class_name": "dog", "probability": 0.5}]
    line = entrypoint.summary(paths, "/d", ["cat", "dog"], secure, plain)
    assert line == "summary: secure==plaintext 1/2, accuracy 1/2, median 4.00 s/image"
    assert SUMMARY.match(line)
    assert "MISMATCH" in capsys.readouterr().out
    assert "unchecked" in entrypoint.summary(paths, "/d", ["cat", "dog"], secure, None)


# -- the compose demo -------------------------------------------------------------------------------------

def _docker_unavailable() -> str | None:
    if not shutil.which("docker"):
        return "no docker command"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker daemon is reachable (start dockerd to run the compose demo)"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0
    if not compose and not shutil.which("docker-compose"):
        return "neither `docker compose` nor docker-compose is installed"
    return None


@pytest.mark.docker
def test_compose_demo_summary_and_teardown():
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    project = f"pi-test-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(["make", "--no-print-directory", "docker-demo", f"COMPOSE_PROJECT={project}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = SUMMARY.search(done.stdout)
    assert match, done.stdout[-3000:]
    same, n = int(match.group(1)), int(match.group(2))
    assert n == len(list((ROOT / "demo" / "images").glob("*.png")))
    # 16-bit fixed point: the shipped model agrees with its plaintext plan on 99.4% of test images
    assert same >= n - 1, match.group(0)
    label = f"label=com.docker.compose.project={project}"
    for kind in ("container", "network", "volume"):
        args = ["docker", kind, "ls", "-q", "--filter", label] + (["-a"] if kind == "container" else [])
        left = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout.split()
        assert not left, f"{kind}s left behind: {left}"
