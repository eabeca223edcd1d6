"""The package reads bottom-up: each module imports only modules of its own layer or below.

:data:`LAYERS` is the map of the package, lowest layer first; a new module
must be placed in it.  Only module-level imports count (those that run when a
module is imported): a function body may import upwards, lazily, as the task
does for the figures.  Two checks run in a fresh interpreter, so that what
this test session has already imported does not hide a load:

* ``import gpudiffim.basis`` loads neither detection nor stamp fitting;
* no algorithm module (every module of ``gpudiffim/`` but ``_backend`` and
  the ``_cuda`` package) imports ``gpudiffim._cuda`` when it is imported.

Where work runs is decided in two functions, each defined once:
``_backend.on_kernel_path`` (kernel path or NumPy reference), asked only by
the operations layer ``_ops.operations_for``, and
``_cuda.launch.launcher_for`` (CuPy or the CPU emulator, from the data); no
algorithm module asks ``on_kernel_path`` or imports ``_cuda``, even inside a
function (only ``_backend``, ``_ops`` and ``__init__`` may); the
``_cuda`` package reads no backend setting, holds one dtype -> C type table
(``signatures.C_TYPES``) and names each host-wrapper module after its ``.cu``
file.
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
     "correlation, Lanczos resampling, delta-function normal equations (the operations layer's reference)",
     {"statistics", "gaussian", "cutouts", "fwhm", "linalg", "_lapack", "convolve", "_resample",
      "delta_function"}),
    ("containers: images, exposures, spatial functions, kernels, the cell set and its reject reasons",
     {"image", "exposure", "spatial", "kernel", "cellset"}),
    ("operations: where each hot operation runs (NumPy reference or CUDA kernels), one data contract",
     {"_ops"}),
    ("basis, spatial-fit and regularisation-strength functions",
     {"basis", "spatial_fit", "regularization"}),
    ("stamps and fits, detection and vetting, whole-image operations, quality",
     {"stamps", "candidates", "quality", "apply", "variance", "covariance", "warp", "registration",
      "sources", "direction", "decorrelation", "difference_psf"}),
    ("the solve loop", {"solve"}),
    ("the task", {"task"}),
    ("I/O, figures, simulation, command line, the package's public names",
     {"io", "diagnostics", "testing", "cli", "batch", "__init__"}),
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


# ---------------------------------------------------------------------------
# where work runs: one function per question (issue 12)

CUDA_PACKAGE = PACKAGE / "_cuda"
#: Modules of ``gpudiffim._cuda`` that are not the host wrapper of a ``.cu`` file.
CUDA_INFRASTRUCTURE = {"__init__", "_host", "_loader", "emulator", "launch", "nvcc_check", "signatures"}


def _package_sources():
    return sorted(PACKAGE.glob("*.py")) + sorted(CUDA_PACKAGE.glob("*.py"))


def _names_used(tree):
    """Identifiers read or imported in ``tree`` (names, attributes, imported names)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names


def _functions_defined(tree):
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_one_function_decides_each_question_of_where_work_runs():
    """``_backend.on_kernel_path`` (kernel path or NumPy reference) and ``_cuda.launch.launcher_for``
    (CuPy or the CPU emulator) are defined once; the CUDA package reads no backend setting and
    its functions take no ``backend`` argument: the launcher follows the data."""
    definers = {"on_kernel_path": set(), "launcher_for": set(), "kernel_path_for": set()}
    for path in _package_sources():
        tree = ast.parse(path.read_text())
        where = path.relative_to(PACKAGE).as_posix()
        for name in _functions_defined(tree) & set(definers):
            definers[name].add(where)
        if path.parent == CUDA_PACKAGE:
            ambient = _names_used(tree) & {"compute_backend", "requested_backend", "use_backend", "_override"}
            assert not ambient, f"{where} reads the requested backend ({sorted(ambient)})"
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                    assert "backend" not in {a.arg for a in args}, f"{where}::{node.name} takes backend="
    assert definers == {"on_kernel_path": {"_backend.py"}, "launcher_for": {"_cuda/launch.py"},
                        "kernel_path_for": set()}


#: Modules that may ask ``on_kernel_path`` or import ``gpudiffim._cuda`` anywhere (function bodies included).
BACKEND_CHOOSERS = {"_backend", "_ops"}


@pytest.mark.parametrize("module", sorted(set(_modules()) - BACKEND_CHOOSERS))
def test_algorithm_modules_leave_the_backend_to_the_operations_layer(module):
    """No branch on the path and no ``_cuda`` import outside ``_backend`` and ``_ops`` (issue 12, item 1)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    assert "on_kernel_path" not in _names_used(tree), f"gpudiffim.{module} asks on_kernel_path; use _ops.operations_for"
    cuda = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module or ""] + ([a.name for a in node.names] if not node.module else [])
            if any(name.split(".")[0] == "_cuda" for name in names):
                cuda.append(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.startswith("gpudiffim._cuda") for m in modules):
                cuda.append(node.lineno)
    assert not cuda, f"gpudiffim.{module} imports gpudiffim._cuda (lines {cuda}); go through gpudiffim._ops"


def test_one_dtype_to_ctype_table():
    """Only ``_cuda/signatures.py`` maps dtypes to the kernels' C types (``C_TYPES``)."""
    tables = []
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                constants = {c.value for c in node.keys + node.values if isinstance(c, ast.Constant)}
                if constants & {"float", "double"}:
                    tables.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}")
    assert len(tables) == 1 and tables[0].startswith("_cuda/signatures.py:"), tables


def test_cuda_wrappers_are_named_after_their_units():
    """One host-wrapper module per ``kernels/*.cu`` file, with the file's name, and no other."""
    from gpudiffim._cuda._loader import units

    wrappers = {path.stem for path in CUDA_PACKAGE.glob("*.py")} - CUDA_INFRASTRUCTURE
    assert wrappers == set(units())


#: Modules that may name CuPy: the array-library adapters and the operations layer.
CUPY_ALLOWED = {"_backend", "_ops"}


def _names_cupy_or_branches_on_it(path):
    """Lines of ``path`` that import CuPy (or cupyx, cupy_backends) or test ``xp is np`` / ``xp is not np``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in {"cupy", "cupyx", "cupy_backends"}
                                                for a in node.names):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"cupy", "cupyx",
                                                                                         "cupy_backends"}:
            found.append(node.lineno)
        elif (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Is, ast.IsNot))
              and isinstance(node.comparators[0], ast.Name) and node.comparators[0].id == "np"):
            found.append(node.lineno)
    return found


@pytest.mark.parametrize("module", sorted(set(_modules()) - CUPY_ALLOWED))
def test_algorithm_modules_have_no_array_library_branches(module):
    """Where NumPy and CuPy differ is said in ``_backend`` (and the kernel path in ``_ops``), nowhere else."""
    lines = _names_cupy_or_branches_on_it(PACKAGE / f"{module}.py")
    assert not lines, f"gpudiffim.{module} names CuPy or branches on the array module (lines {lines})"
