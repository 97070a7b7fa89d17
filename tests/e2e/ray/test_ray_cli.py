"""``anonjoin load --ray ADDRESS`` end to end on a real two-node cluster: 200 guests through two actors
against the embedded simulator (in the parent), Ctrl-C mid-run (every actor's guests leave, both results
come back), and the flags' one-line errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from anonjoin._cli import main

from support.processes import clean_env
from support.ray_cluster import RayCluster, require_ray, two_node_cluster

require_ray()

pytestmark = pytest.mark.usefixtures("no_target_env")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    yield from two_node_cluster()


def test_200_guests_through_ray_against_the_embedded_simulator(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "anonjoin", "load", "--ray", ray_cluster.address, "--guests", "200",
         "--concurrency", "20", "--hold", "0.2", "--progress", "plain", "--progress-interval", "0.5",
         "--store", str(tmp_path / "s.db")],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["joined"] == report["guests"] == 200
    assert report["shards"] == {"count": 2, "missing": [], "reason": None}  # default: the cluster's CPUs
    assert report["settings"]["ray"] == ray_cluster.address and report["settings"]["ray_nodes"] == 2
    assert report["service_check"]["ok"] is True
    assert len({g["guest_id"] for g in report["guest_outcomes"]}) == 200
    assert "in 2 Ray actors over 2 node(s)" in run.stderr
    # Ray stays quiet without -v: every line on stderr is anonjoin's (the start line, progress)
    assert all(line.startswith(("anonjoin", "[")) for line in run.stderr.strip().splitlines()), run.stderr
    assert (tmp_path / "anonjoin-report.html").is_file()


def test_ctrl_c_mid_run_cancels_every_actor_and_merges_both_results(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "anonjoin", "load", "--ray", ray_cluster.address, "--guests", "200",
         "--rate", "40", "--concurrency", "10", "--hold", "60", "--progress", "plain",
         "--progress-interval", "0.2", "--store", ":memory:"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            joined = re.search(r"  joined (\d+)  ", line)
            if line.startswith("[") and joined and int(joined.group(1)) >= 10:
                break
        else:
            pytest.fail("no progress: " + "".join(seen))
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["interrupted"] is True
    assert report["shards"]["missing"] == []  # both actors gave their result back
    assert report["joined"] >= 10
    assert report["joined"] + report["cancelled"] == report["guests"] == 200
    assert report["service_check"]["live_applications_at_end"] == 0  # every joined guest left


def test_more_shards_than_the_cluster_has_cpus_is_refused_before_any_request(
    ray_cluster: RayCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["load", "--ray", ray_cluster.address, "--shards", "3", "--progress", "off", "--store", ":memory:"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--shards 3 needs 3 CPUs of the Ray cluster (one actor each); it has 2" in err
    assert len(err.strip().splitlines()) == 1
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shards", "2"], "--shards applies to --ray"),
        (["--ray", "auto", "--workers", "2"], "--ray and --workers are two ways"),
        (["--ray", "127.0.0.1:1"], "cannot attach to the Ray cluster at 127.0.0.1:1"),
    ],
)
def test_bad_ray_flags_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["load", "--progress", "off", "--store", ":memory:", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_without_ray_installed_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["load", "--ray", "auto", "--progress", "off", "--store", ":memory:"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "anonjoin load: error: Ray is not installed: pip install 'anonjoin[ray]'"
