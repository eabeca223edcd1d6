"""The package reads bottom-up: each module imports only modules of its own layer or below.

:data:`LAYERS` is the map of the package, lowest layer first; a new module
must be placed in it.  Only module-level imports count (those that run when a
module is imported): a function body may import upwards, lazily, as the task
does for the figures.  Two checks run in a fresh interpreter, so that what
this test session has already imported does not hide a load:

* ``import gpudiffim.basis`` loads neither detection nor stamp fitting;
* no algorithm module (every module of ``gpudiffim/`` but ``_backend`` and
  the ``_cuda`` package) imports ``gpudiffim._cuda`` when it is imported.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpudiffim

PACKAGE = Path(gpudiffim.__file__).parent

#: (description, modules), lowest layer first.
LAYERS = (
    ("foundation: errors, argument checks, backend choice, configuration",
     {"errors", "_validate", "_backend", "config"}),
    ("array helpers: statistics, Gaussian widths, stamp geometry and cutting, PSF size, linear algebra, "
     "correlation", {"statistics", "gaussian", "cutouts", "fwhm", "linalg", "convolve"}),
    ("containers: images, exposures, spatial functions, kernels, the cell set and its reject reasons",
     {"image", "exposure", "spatial", "kernel", "cellset"}),
    ("basis and spatial-fit functions", {"basis", "spatial_fit"}),
    ("stamps and fits, detection and vetting, whole-image operations, quality",
     {"stamps", "candidates", "quality", "apply", "variance", "covariance", "warp", "registration"}),
    ("the solve loop", {"solve"}),
    ("the task", {"task"}),
    ("I/O, figures, simulation, command line, the package's public names",
     {"io", "diagnostics", "testing", "cli", "__init__"}),
)

LAYER = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}

#: Where the CUDA package may be imported at module level (the backend probe).
CUDA_ALLOWED = {"_backend"}


def _modules():
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def _module_level_imports(path):
    """``(module, line)`` of the package-relative imports run when ``path`` is imported.

    Statements inside function bodies are left out; those in class bodies and
    in module-level ``if``/``try`` blocks count.  ``from . import name``
    gives ``name`` when it is a module of the package, else ``__init__``.
    """
    found = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.append((node.module, node.lineno))
                else:
                    found.extend((a.name if (PACKAGE / f"{a.name}.py").is_file() or (PACKAGE / a.name).is_dir()
                                  else "__init__", node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpudiffim."):
                found.append((node.module.removeprefix("gpudiffim."), node.lineno))
            elif isinstance(node, ast.Import):
                found.extend((a.name.removeprefix("gpudiffim."), node.lineno) for a in node.names
                             if a.name.startswith("gpudiffim."))
            for name in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, name, None) or [])

    visit(ast.parse(path.read_text()).body)
    return found


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER), "place each module of gpudiffim/ in LAYERS"
    assert sum(len(modules) for _, modules in LAYERS) == len(LAYER)      # no module in two layers


@pytest.mark.parametrize("module", _modules())
def test_imports_go_down_the_layers(module):
    upward = []
    for imported, line in _module_level_imports(PACKAGE / f"{module}.py"):
        top = imported.split(".")[0]
        if top == "_cuda":
            continue                                                  # checked below
        if LAYER[top] > LAYER[module]:
            upward.append(f"line {line}: {module} ({LAYERS[LAYER[module]][0].split(':')[0]}) imports {top} "
                          f"({LAYERS[LAYER[top]][0].split(':')[0]})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module", sorted(set(_modules()) - CUDA_ALLOWED))
def test_no_module_level_cuda_import(module):
    lines = [line for imported, line in _module_level_imports(PACKAGE / f"{module}.py")
             if imported.split(".")[0] == "_cuda"]
    assert not lines, f"gpudiffim.{module} imports gpudiffim._cuda at module level (lines {lines})"


def _loaded_after(statement):
    """Names of the ``gpudiffim`` modules loaded by ``statement`` in a fresh interpreter."""
    code = (f"import json, sys\n{statement}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gpudiffim'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"GPUDIFFIM_BACKEND": "numpy", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_basis_loads_no_detection_or_stamp_fitting():
    loaded = _loaded_after("import gpudiffim.basis")
    assert "gpudiffim.basis" in loaded
    heavy = {f"gpudiffim.{m}" for m in ("candidates", "stamps", "cellset", "solve", "task", "_cuda")}
    assert not loaded & heavy, f"import gpudiffim.basis loads {sorted(loaded & heavy)}"


def test_algorithm_modules_load_no_cuda_package():
    names = [m for m in _modules() if m not in CUDA_ALLOWED | {"__init__"}]
    loaded = _loaded_after("\n".join(f"import gpudiffim.{m}" for m in names))
    assert {f"gpudiffim.{m}" for m in names} <= loaded
    assert not {m for m in loaded if m.startswith("gpudiffim._cuda")}


def test_public_names_load_on_first_access():
    loaded = _loaded_after("import gpudiffim")
    assert "gpudiffim.task" not in loaded
    loaded = _loaded_after("from gpudiffim import ImagePsfMatchTask, SubtractResult")
    assert "gpudiffim.task" in loaded
    assert set(gpudiffim.__all__) <= set(dir(gpudiffim))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        gpudiffim.not_a_name  # noqa: B018
