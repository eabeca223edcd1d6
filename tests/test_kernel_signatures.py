"""The launch table ``gpudiffim._cuda.signatures.KERNELS`` agrees with the ``.cu`` sources.

``signatures.py`` is a hand-kept second copy of every kernel's parameter list
(the launch checks and the emulator's shims are generated from it, and CuPy
checks nothing), so this test reads each ``__global__`` definition of
``kernels/*.cu`` and its explicit instantiations, and compares them with the
table: the same entry points per unit (a template once per instantiated
type, keyed as CuPy's ``name_expressions``: ``gdi_residual_moments<float>``),
the same parameter names in the same order, and the same C types
(``__restrict__`` dropped; ``T`` replaced by the instantiated type).  The
perturbation tests show that each kind of drift is caught, on a copy of the
sources or of the table.
"""

import dataclasses
import re
import shutil

import pytest

from gpudiffim._cuda._loader import kernel_dir
from gpudiffim._cuda.signatures import KERNELS, KernelSpec

#: A ``__global__`` function: optional ``template <...>`` head, name, optional
#: ``<type>`` of an explicit instantiation, parameters, then ``{`` (definition)
#: or ``;`` (declaration or instantiation).
_GLOBAL = re.compile(r"(?P<template>template\s*(?:<(?P<params>[^>]*)>)?\s*)?__global__\s+void\s+"
                     r"(?P<name>\w+)\s*(?:<(?P<arg>[^>]*)>)?\s*\((?P<args>[^)]*)\)\s*(?P<end>[{;])")


def _strip_comments(text):
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _ctype(text, substitutions=()):
    """Normalised C type: no ``__restrict__``, single spaces, ``*`` attached (``"const float*"``)."""
    text = text.replace("__restrict__", " ")
    for parameter, value in substitutions:
        text = re.sub(rf"\b{parameter}\b", value, text)
    return re.sub(r"\s*\*\s*", "*", " ".join(text.split())).strip()


def _split_parameter(text):
    """``(name, C type)`` of one declared parameter (``const T* __restrict__ diff``)."""
    match = re.fullmatch(r"(?P<type>.*?[\s*])(?P<name>\w+)", " ".join(text.split()))
    if match is None:
        raise ValueError(f"cannot read the parameter {text!r}")
    return match["name"], match["type"]


def _parameters(args):
    return [a for a in (p.strip() for p in args.split(",")) if a]


def parse_units(folder):
    """Every launchable entry point of the ``.cu`` files in ``folder``.

    Returns
    -------
    entries : dict of str to KernelSpec
        Keyed as :data:`~gpudiffim._cuda.signatures.KERNELS` (a template
        once per explicit instantiation).
    problems : list of str
        Instantiations whose types differ from their definition, templates
        that are never instantiated, instantiations of no definition.
    """
    entries, problems = {}, []
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(".cu"):
            continue
        unit = path.name[:-3]
        definitions, instances = {}, []
        for match in _GLOBAL.finditer(_strip_comments(path.read_text())):
            if match["end"] == "{":
                template = [p.split()[-1] for p in _parameters(match["params"] or "")]
                definitions[match["name"]] = (template, [_split_parameter(p) for p in _parameters(match["args"])])
            elif match["arg"] is not None:
                instances.append((match["name"], [a.strip() for a in match["arg"].split(",")],
                                  [_ctype(a) for a in _parameters(match["args"])]))
        for name, types, declared in instances:
            if name not in definitions:
                problems.append(f"{unit}.cu: instantiation {name}<{', '.join(types)}> of no definition")
                continue
            template, params = definitions[name]
            key = f"{name}<{', '.join(types)}>"
            substituted = tuple((p, _ctype(t, zip(template, types))) for p, t in params)
            if [t for _, t in substituted] != declared:
                problems.append(f"{unit}.cu: {key} instantiated as ({', '.join(declared)}), defined as "
                                f"({', '.join(t for _, t in substituted)})")
            entries[key] = KernelSpec(unit, substituted)
        for name, (template, params) in definitions.items():
            if not template:
                entries[name] = KernelSpec(unit, tuple((p, _ctype(t)) for p, t in params))
            elif not any(i[0] == name for i in instances):
                problems.append(f"{unit}.cu: template {name} is never instantiated (CuPy cannot find it)")
    return entries, problems


def signature_drift(entries, table):
    """Differences between the entry points read from the sources and the launch table, as sentences."""
    drift = [f"{key}: in the .cu sources ({entries[key].unit}.cu), not in signatures.KERNELS"
             for key in sorted(set(entries) - set(table))]
    drift += [f"{key}: in signatures.KERNELS, not in the .cu sources" for key in sorted(set(table) - set(entries))]
    for key in sorted(set(entries) & set(table)):
        source, kept = entries[key], table[key]
        if source.unit != kept.unit:
            drift.append(f"{key}: defined in {source.unit}.cu, listed under unit {kept.unit!r}")
        if [n for n, _ in source.params] != [n for n, _ in kept.params]:
            drift.append(f"{key}: parameter names {[n for n, _ in source.params]} in the source, "
                         f"{[n for n, _ in kept.params]} in the table")
        types = [(n, s, _ctype(k)) for (n, s), (_, k) in zip(source.params, kept.params) if s != _ctype(k)]
        drift += [f"{key}: parameter {n} is {s!r} in the source, {k!r} in the table" for n, s, k in types]
    return drift


def _check(folder, table=KERNELS):
    entries, problems = parse_units(folder)
    return problems + signature_drift(entries, table)


def test_every_unit_has_entry_points():
    entries, problems = parse_units(kernel_dir())
    assert not problems
    assert {spec.unit for spec in entries.values()} == {p.name[:-3] for p in kernel_dir().iterdir()
                                                        if p.name.endswith(".cu")}
    assert len(entries) >= 13


def test_signature_table_matches_the_sources():
    drift = _check(kernel_dir())
    assert not drift, "signatures.KERNELS differs from kernels/*.cu:\n" + "\n".join(drift)


# ----------------------------------------------------------------------------
# Drift is caught: perturbed copies of the sources and of the table


def _copy_sources(tmp_path):
    folder = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), folder)
    return folder


def _edit(folder, unit, old, new):
    path = folder / f"{unit}.cu"
    text = path.read_text()
    assert text.count(old) == 1, f"perturbation {old!r} not found once in {unit}.cu"
    path.write_text(text.replace(old, new))


SOURCE_PERTURBATIONS = {
    "renamed parameter": ("residual_moments", "int bad_bits,\n                                     int n_stamps, int ny",
                          "int bad_bit_mask,\n                                     int n_stamps, int ny",
                          "gdi_residual_moments<float>: parameter names"),
    "reordered parameters": ("spatial_assembly", "int n_stamps, int p, int n_theta,",
                             "int p, int n_stamps, int n_theta,", "gdi_spatial_normal_equations: parameter names"),
    "changed type": ("warp", "int use_scale,", "double use_scale,",
                     "gdi_warp_lanczos3<double>: parameter use_scale is 'double'"),
    "lost const": ("image_apply", "__global__ void gdi_or_filter_1d(const int* __restrict__ mask,",
                   "__global__ void gdi_or_filter_1d(int* __restrict__ mask,",
                   "gdi_or_filter_1d: parameter mask is 'int*'"),
    "added parameter": ("stamp_fit", "int n_stamps, int n_basis, int n_pix, int with_background,",
                        "int n_stamps, int n_basis, int n_pix, int with_background, int n_extra,",
                        "gdi_normal_equations<float>: parameter names"),
    "dropped instantiation": ("residual_moments", "template __global__ void gdi_residual_moments<double>",
                              "// template __global__ void gdi_residual_moments<double>",
                              "gdi_residual_moments<double>: in signatures.KERNELS, not in the .cu sources"),
    "new kernel": ("spatial_assembly", "__global__ void gdi_spatial_normal_equations(",
                   "__global__ void gdi_new_kernel(int n) {}\n__global__ void gdi_spatial_normal_equations(",
                   "gdi_new_kernel: in the .cu sources (spatial_assembly.cu), not in signatures.KERNELS"),
    "instantiation disagrees with definition": (
        "image_apply", "template __global__ void gdi_accumulate_terms<float>(const float*, int, int, int, int, int,",
        "template __global__ void gdi_accumulate_terms<float>(const float*, int, int, int, int,",
        "gdi_accumulate_terms<float> instantiated as"),
}


@pytest.mark.parametrize("perturbation", list(SOURCE_PERTURBATIONS))
def test_drift_in_a_source_copy_is_caught(tmp_path, perturbation):
    unit, old, new, expected = SOURCE_PERTURBATIONS[perturbation]
    folder = _copy_sources(tmp_path)
    assert not _check(folder)
    _edit(folder, unit, old, new)
    drift = _check(folder)
    assert any(expected in line for line in drift), drift


def _with_spec(key, **changes):
    table = dict(KERNELS)
    table[key] = dataclasses.replace(table[key], **changes)
    return table


def _swapped(params, i, j):
    params = list(params)
    params[i], params[j] = params[j], params[i]
    return tuple(params)


TABLE_PERTURBATIONS = {
    "wrong unit": (lambda: _with_spec("gdi_or_filter_footprint", unit="warp"),
                   "gdi_or_filter_footprint: defined in image_apply.cu, listed under unit 'warp'"),
    "swapped parameters": (lambda: _with_spec("gdi_correlate_stamps<float>", params=_swapped(
        KERNELS["gdi_correlate_stamps<float>"].params, 2, 3)), "gdi_correlate_stamps<float>: parameter names"),
    "wrong pointee": (lambda: _with_spec("gdi_normal_equations<double>", params=tuple(
        (n, "float*" if n == "matrix" else t) for n, t in KERNELS["gdi_normal_equations<double>"].params)),
        "gdi_normal_equations<double>: parameter matrix is 'double*' in the source, 'float*' in the table"),
    "missing entry": (lambda: {k: v for k, v in KERNELS.items() if k != "gdi_warp_lanczos3<float>"},
                      "gdi_warp_lanczos3<float>: in the .cu sources (warp.cu), not in signatures.KERNELS"),
}


@pytest.mark.parametrize("perturbation", list(TABLE_PERTURBATIONS))
def test_drift_in_a_table_copy_is_caught(perturbation):
    make_table, expected = TABLE_PERTURBATIONS[perturbation]
    drift = _check(kernel_dir(), make_table())
    assert any(expected in line for line in drift), drift


def test_parser_reads_comments_templates_and_pointers(tmp_path):
    (tmp_path / "toy.cu").write_text(
        "// __global__ void gdi_commented(int a) {}\n"
        "/* __global__ void gdi_block_commented(int a) {} */\n"
        "template <typename T>\n__global__ void gdi_toy(const T* __restrict__ x,\n"
        "                        int n, T *out) { }\n"
        "template __global__ void gdi_toy<float>(const float*, int, float*);\n"
        "__global__ void gdi_plain(double* __restrict__ y) { }\n")
    entries, problems = parse_units(tmp_path)
    assert not problems
    assert entries == {"gdi_toy<float>": KernelSpec("toy", (("x", "const float*"), ("n", "int"),
                                                            ("out", "float*"))),
                       "gdi_plain": KernelSpec("toy", (("y", "double*"),))}
