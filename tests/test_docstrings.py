"""Every docstring example (numpydoc ``Examples``) of every gpudiffim module runs as documented.

The modules are found with :func:`pkgutil.walk_packages` over the installed
package, so a new module is covered without editing this file; each is one
test.  The examples run with :mod:`doctest` under the warnings filters of the
test session (the project's ``filterwarnings = error``), so an example that
warns fails like one that raises.  The CUDA modules (``gpudiffim._cuda``) are
included: they import without a GPU.  ``gpudiffim.diagnostics`` is skipped
only where matplotlib is missing.

Examples must stay cheap (well under a second or two each); ``--durations``
shows the slow modules.
"""

import doctest
import importlib
import pkgutil
import textwrap
import warnings

import pytest

import gpudiffim

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: Docstrings with examples, and examples (``>>>`` statements, skipped ones
#: included), in the package when this test was written: the finder must not
#: silently find fewer.  Raise them when examples are added.
MIN_DOCSTRINGS = 13
MIN_EXAMPLES = 50

#: Modules that need an optional dependency to run their examples.
OPTIONAL = {"gpudiffim.diagnostics": "matplotlib"}


def _raise(name):
    """``walk_packages`` would otherwise skip a subpackage that fails to import."""
    raise ImportError(f"cannot import package {name} while listing the modules of gpudiffim")


MODULES = sorted(info.name for info in pkgutil.walk_packages(gpudiffim.__path__, prefix="gpudiffim.",
                                                             onerror=_raise))


def _import(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name], reason=f"the examples of {name} need {OPTIONAL[name]}")
    return importlib.import_module(name)


def _docstring_tests(module):
    """Doctests of the objects defined in ``module`` (not of those it imports)."""
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


def _run(tests):
    """Run doctests; return ``(attempted, failure reports)``."""
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    attempted, failures = 0, []
    for test in tests:
        report = []
        result = runner.run(test, out=report.append)
        attempted += result.attempted
        if result.failed:
            failures.append(f"{test.name}: {result.failed} of {result.attempted} examples failed\n"
                            + "".join(report))
    return attempted, failures


def test_modules_are_found():
    assert {"gpudiffim", "gpudiffim.task", "gpudiffim.warp", "gpudiffim._cuda.emulator"} \
        <= {"gpudiffim", *MODULES}


@pytest.mark.parametrize("name", ["gpudiffim", *MODULES])
def test_docstring_examples(name):
    _, failures = _run(_docstring_tests(_import(name)))
    assert not failures, f"{len(failures)} docstring(s) of {name} with failing examples:\n\n" \
        + "\n".join(failures)


def test_examples_are_found():
    """The finder sees at least the examples that exist today (it cannot silently find none)."""
    tests = [test for name in ["gpudiffim", *MODULES] if name not in OPTIONAL
             for test in _docstring_tests(importlib.import_module(name))]
    n_examples = sum(len(test.examples) for test in tests)
    assert len(tests) >= MIN_DOCSTRINGS and n_examples >= MIN_EXAMPLES, \
        f"found {n_examples} examples in {len(tests)} docstrings, expected at least " \
        f"{MIN_EXAMPLES} in {MIN_DOCSTRINGS}: " + ", ".join(test.name for test in tests)


def test_warnings_fail_examples():
    """An example that warns fails under the session's filters (``filterwarnings = error``)."""
    source = textwrap.dedent("""
        >>> import warnings
        >>> from gpudiffim.errors import FitQualityWarning
        >>> warnings.warn("poor fit", FitQualityWarning)
        >>> 1 + 1
        2
        """)
    test = doctest.DocTestParser().get_doctest(source, {}, "warning_example", "<test>", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference run: without the filter the example passes
        assert _run([test]) == (4, [])
    attempted, failures = _run([test])
    assert attempted == 4 and len(failures) == 1
    assert "FitQualityWarning: poor fit" in failures[0]
