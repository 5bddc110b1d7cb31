"""Repository rules that keep the layers honest: the import graph, the torch.distributed owner,
no module shadowing the standard library, no reference to a document outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package may import the packages listed for it, and nothing else of the project
# (docs/architecture.md#packages). The order is the layering: core at the bottom, train on top.
ALLOWED_IMPORTS = {
    "core": set(),
    "shards": {"core"},
    "pipeline": {"core", "shards"},
    "cluster": {"core", "shards", "pipeline"},
    "model": {"core", "pipeline", "cluster"},
    "evaluate": {"core", "shards", "pipeline", "cluster", "model"},
    "train": {"core", "shards", "pipeline", "cluster", "model", "evaluate"},
}
PROJECT = set(ALLOWED_IMPORTS)
DIST_OWNERS = {Path("core/dist.py"), Path("train/engine.py")}
DIST_USE = re.compile(r"torch\.distributed|from torch import distributed")


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages that `path` imports (at any depth of the file: lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_packages_import_only_the_layers_below():
    offenders = []
    for package, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in sorted(_project_imports(path) - allowed - {package}):
                offenders.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not offenders, "layering broken:\n" + "\n".join(offenders)


def test_the_layer_table_is_acyclic_and_matches_the_folders():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == PROJECT
    order = ["core", "shards", "pipeline", "cluster", "model", "evaluate", "train"]
    for i, package in enumerate(order):
        assert ALLOWED_IMPORTS[package] <= set(order[:i]), package


def test_torch_distributed_only_in_dist_and_engine():
    offenders = []
    for package in [*PROJECT, "bench"]:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel not in DIST_OWNERS and DIST_USE.search(path.read_text()):
                offenders.append(str(rel))
    assert not offenders, f"torch.distributed used outside core/dist.py and train/engine.py: {offenders}"


def test_no_module_shadows_the_standard_library():
    shadows = [str(p.relative_to(ROOT)) for package in [*PROJECT, "bench", "tests", "scripts"]
               for p in (ROOT / package).rglob("*.py") if p.stem in sys.stdlib_module_names]
    assert not shadows, f"these names hide a standard-library module when run as a script: {shadows}"


def test_no_reference_to_documents_outside_the_repository():
    """Every Markdown document a source, config or doc names is in the repository, no relative path
    climbs out of it, and no comment cites numbered sections of an outside text, as "spec" and a number."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    basenames = {Path(name).name for name in tracked}
    named_doc = re.compile(r"[\w./-]*\w\.md\b")
    climbing = re.compile(r"(?:\.\./)+[\w./-]+")
    section_cite = re.compile(r"\bspec \d|\((?:style|design) \d")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if not name.endswith((".py", ".md", ".yaml", ".sh", ".toml")) or not path.is_file():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            docs = [d for d in named_doc.findall(line) if Path(d).name not in basenames]
            outside = [c for c in climbing.findall(line)
                       if ROOT not in (path.parent / c).resolve().parents]
            if docs or outside or section_cite.search(line):
                offenders.append(f"{name}:{n}")
    assert not offenders, f"cite docs/method.md or docs/architecture.md instead: {offenders}"


def test_method_citations_name_existing_sections():
    anchors = set(re.findall(r'<a id="s([\d.]+)"></a>', (ROOT / "docs/method.md").read_text()))
    cited = re.compile(r"method(?:\.md)? §(\d+(?:\.\d+)?)")
    missing = []
    for package in [*PROJECT, "bench", "tests"]:
        for path in (ROOT / package).rglob("*.py"):
            missing += [f"{path.relative_to(ROOT)}: §{s}" for s in cited.findall(path.read_text())
                        if s not in anchors]
    assert not missing, f"no such section in docs/method.md: {missing}"


@pytest.mark.parametrize("script", ["hcsc-train", "hcsc-shards", "hcsc-eval"])
def test_console_scripts_have_help(script):
    exe = Path(sys.executable).parent / script
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_a_cli_file_runs_as_a_script():
    """`python train/cli.py` puts train/ first on sys.path; nothing there may hide a stdlib module."""
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "cli.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr


def test_readme_layout_table_lists_every_folder():
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `([\w]+)/` \|", readme, flags=re.M))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    folders = {name.split("/")[0] for name in tracked.stdout.split() if "/" in name} - {".ci"}
    assert rows == folders, f"README layout rows {sorted(rows)} vs folders {sorted(folders)}"


def test_the_docker_image_is_one_cuda_stack_with_every_package():
    """The Dockerfile against pyproject.toml and constraints.txt: every package copied, the base
    image's CUDA major equal to torch's and DALI's, its Python allowed by requires-python."""
    import tomllib

    docker = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = (ROOT / "constraints.txt").read_text()
    for package in project["tool"]["setuptools"]["packages"]:
        assert re.search(rf"^COPY {package} {package}$", docker, re.M), f"Dockerfile does not copy {package}/"
    base_cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.", docker, re.M)
    assert base_cuda, "the Dockerfile's base is not an nvidia/cuda image"
    torch_cuda = {m for m in re.findall(r"^nvidia-(?:cudnn|nccl|cusparselt)-cu(\d+)==", pins, re.M)}
    dali_cuda = re.findall(r"^nvidia-dali-cuda(\d+)0==", pins, re.M)
    assert torch_cuda == {base_cuda.group(1)} and dali_cuda == [base_cuda.group(1)]
    dependencies = project["project"]["dependencies"]
    assert any(d.startswith(f"nvidia-dali-cuda{base_cuda.group(1)}0") for d in dependencies)
    python = re.search(r"python(3\.\d+)-venv", docker)
    low, high = re.fullmatch(r">=(3\.\d+),<(3\.\d+)", project["project"]["requires-python"]).groups()
    version = tuple(int(x) for x in python.group(1).split("."))
    assert tuple(int(x) for x in low.split(".")) <= version < tuple(int(x) for x in high.split("."))
    # faiss only through the extras that hold exactly one build each (core/install.py)
    assert not any(d.startswith("faiss") for d in dependencies)
    extras = project["project"]["optional-dependencies"]
    assert [d for d in extras["cpu"] if d.startswith("faiss")] == ["faiss-cpu>=1.8"]
    assert [d for d in extras["gpu"] if d.startswith("faiss")] == ["faiss-gpu>=1.15"]
