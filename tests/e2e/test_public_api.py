import inspect
import json
import typing
from pathlib import Path

import anonjoin


def test_all_is_sorted_and_resolves() -> None:
    names = [n for n in anonjoin.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in anonjoin.__all__:
        assert hasattr(anonjoin, name), name


def test_public_objects_come_from_private_modules() -> None:
    for name in anonjoin.__all__:
        obj = getattr(anonjoin, name)
        module = getattr(obj, "__module__", "anonjoin")
        assert module.startswith("anonjoin"), (name, module)
        tail = module.split(".")
        assert any(part.startswith("_") for part in tail[1:]) or module == "anonjoin", (name, module)


def test_the_report_can_be_built_and_written_with_public_names(tmp_path: Path) -> None:
    hints = typing.get_type_hints(anonjoin.LoadResult)
    assert hints["guests"] == list[anonjoin.GuestRecord]  # what LoadResult.guests holds is exported
    params = inspect.signature(anonjoin.write_report).parameters
    for name in ("json", "html", "csv", "junit", "settings", "fail_if"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert all(p.annotation is not inspect.Parameter.empty for p in params.values())
    assert anonjoin.write_report.__doc__ and anonjoin.build_report.__doc__
    metrics = anonjoin.Metrics(guests=1)
    records = [anonjoin.GuestRecord("g1", "asi-1", "failed", "Denied")]
    report = anonjoin.build_report(metrics, records, {"client_secret": "s3cr3t"}, started_at=0.0)
    written = anonjoin.write_report(report, json=tmp_path / "r.json", junit=tmp_path / "r.xml")
    assert written == report and report["failures_by_reason"] == {"Denied": 1}
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == report["schema"]
    assert "s3cr3t" not in (tmp_path / "r.json").read_text()
    assert "failed: Denied" in (tmp_path / "r.xml").read_text()


def test_the_ray_engine_is_public_without_importing_ray() -> None:
    import subprocess
    import sys

    code = "import sys, anonjoin; anonjoin.RayEngine; assert 'ray' not in sys.modules, 'ray imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert anonjoin.RayEngine.__module__ == "anonjoin._load.ray"
