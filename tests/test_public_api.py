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


def test_the_ray_engine_is_public_without_importing_ray() -> None:
    import subprocess
    import sys

    code = "import sys, anonjoin; anonjoin.RayEngine; assert 'ray' not in sys.modules, 'ray imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert anonjoin.RayEngine.__module__ == "anonjoin._ray"
