"""The project file: every module of the checkout is in the package and known to ruff as first-party."""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (requires-python): the same parser as a package
    import tomli as tomllib

from conftest import ROOT


def test_pyproject_lists_every_module():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    top_level = {p.stem for p in ROOT.glob("*.py")}
    helpers = {p.stem for p in (ROOT / "tests").glob("*.py") if not p.stem.startswith("test_")} | \
              {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("bench_")} - {"gpu_bench"}
    assert set(project["tool"]["setuptools"]["py-modules"]) == top_level
    first_party = set(project["tool"]["ruff"]["lint"]["isort"]["known-first-party"])
    assert top_level | helpers <= first_party, sorted(top_level | helpers - first_party)
    assert not (ROOT / "ruff.toml").exists() and not (ROOT / "pytest.ini").exists()  # one place for settings


def test_readmes_give_the_cpu_only_install():
    """PyPI's Linux torch is the CUDA build (a 6.4 GB virtualenv): users without a GPU need PyTorch's CPU index."""
    for name in ("README.md", "README_zh.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in text, name
