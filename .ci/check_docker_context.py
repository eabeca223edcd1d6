#!/usr/bin/env python3
"""Build the Docker image's wheel from exactly what the ``Dockerfile`` copies into the image.

``python .ci/check_docker_context.py`` (run by ``.ci/run``; its functions are
tested by ``tests/test_docker_context.py``):

1. parses the ``Dockerfile``'s ``COPY`` and ``WORKDIR`` instructions and copies
   what they name from the build context (the checkout, less what
   ``.dockerignore`` excludes) into a temporary directory laid out as the
   image's file system (``<tmp>/opt/gpudiffim/...``);
2. finds the ``pip install`` of a local path (``".[cuda12x,plot]"``) and builds
   a wheel from that path with ``pip wheel --no-deps``, so the build sees only
   the files the image build would see;
3. checks that the wheel holds every ``kernels/*.cu`` of the checkout as
   ``gpudiffim/kernels/*.cu`` and ``gpudiffim/_cuda/emulator.h``;
4. runs ``docker build`` where a Docker engine answers (``docker info``
   succeeds), else prints that it was skipped.

Supported Dockerfile subset: one stage; ``COPY`` in shell or JSON form with
``--chown``/``--chmod``/``--link`` flags (``--from`` copies are ignored: they
do not read the build context), glob sources, directories copied by content;
``WORKDIR`` absolute or relative.  Anything else that would change what is
copied (``ADD``, ``$VARIABLES`` in paths, heredocs, ``--parents``) raises
:class:`CheckError` rather than being guessed.  Standard library only.
"""

import argparse
import dataclasses
import glob
import importlib.metadata
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "BuildBackendUnavailable",
    "CheckError",
    "Copy",
    "Instruction",
    "InstallTarget",
    "ROOT",
    "assemble_context",
    "build_requirements_installed",
    "build_wheel",
    "check",
    "copies",
    "docker_build",
    "docker_engine_available",
    "environment",
    "final_workdir",
    "install_target",
    "instructions",
    "main",
    "wheel_problems",
]

#: The checkout (this file is ``<ROOT>/.ci/check_docker_context.py``).
ROOT = Path(__file__).resolve().parent.parent

_PIP_TAIL = 3000  # characters of pip's output quoted in an error


class CheckError(RuntimeError):
    """The Dockerfile cannot be checked, or its build context does not build a correct wheel."""


class BuildBackendUnavailable(CheckError):
    """An isolated build found no build requirement at all on pip's index (offline, no local index).

    The only build failure that says nothing about the project: tests skip on
    it, CI (which needs an index for ``pip install .`` anyway) fails.
    """


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: first line number, upper-case keyword, argument text."""

    line: int
    keyword: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class Copy:
    """One ``COPY`` from the build context.

    Attributes
    ----------
    line : int
        Line number in the Dockerfile.
    sources : tuple of str
        Paths (or glob patterns) relative to the build context.
    destination : str
        Absolute path in the image (``WORKDIR``-relative destinations resolved).
    into_directory : bool
        The destination is a directory (ends with ``/``, is ``.``, or several
        sources are given) rather than a file name.
    """

    line: int
    sources: tuple
    destination: str
    into_directory: bool


@dataclasses.dataclass(frozen=True)
class InstallTarget:
    """The local project a ``RUN pip install`` installs: absolute image path and extras."""

    line: int
    path: str
    extras: tuple


def _escape_char(lines):
    """The parser directive ``# escape=`` (default backslash)."""
    for line in lines:
        match = re.fullmatch(r"\s*#\s*(\w+)\s*=\s*(\S+)\s*", line)
        if not match:
            break
        if match.group(1).lower() == "escape":
            return match.group(2)
    return "\\"


def instructions(text):
    """Logical instructions of Dockerfile ``text``: comments dropped, continuation lines joined.

    Parameters
    ----------
    text : str
        Dockerfile contents.

    Returns
    -------
    list of Instruction
    """
    lines = text.splitlines()
    escape = _escape_char(lines)
    out, parts, start = [], [], None
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and parts):
            continue  # comments, also inside a continued instruction; blank continuation lines
        if not stripped:
            continue
        if start is None:
            start = number
        if stripped.endswith(escape):
            parts.append(stripped[: -len(escape)].strip())
            continue
        parts.append(stripped)
        logical = " ".join(p for p in parts if p)
        keyword, _, arguments = logical.partition(" ")
        out.append(Instruction(start, keyword.upper(), arguments.strip()))
        parts, start = [], None
    if parts:
        msg = f"Dockerfile ends inside the instruction started on line {start} (trailing {escape!r})"
        raise CheckError(msg)
    return out


def _no_variables(instruction, values):
    for value in values:
        if "$" in value:
            msg = (f"Dockerfile line {instruction.line}: {instruction.keyword} {value!r} uses a variable; "
                   "this check does not expand ARG/ENV variables")
            raise CheckError(msg)


def _copy_operands(instruction):
    """Flags and ``[sources..., destination]`` of a COPY instruction."""
    text = instruction.arguments
    flags = []
    while text.startswith("--"):
        flag, _, text = text.partition(" ")
        flags.append(flag)
        text = text.lstrip()
    if "<<" in text:
        msg = f"Dockerfile line {instruction.line}: COPY heredocs are not supported by this check"
        raise CheckError(msg)
    if text.startswith("["):
        try:
            operands = json.loads(text)
        except json.JSONDecodeError as error:
            msg = f"Dockerfile line {instruction.line}: COPY in JSON form is not valid JSON: {error}"
            raise CheckError(msg) from None
        if not isinstance(operands, list) or not all(isinstance(o, str) for o in operands):
            msg = f"Dockerfile line {instruction.line}: COPY in JSON form must be a list of strings"
            raise CheckError(msg)
    else:
        operands = text.split()
    if len(operands) < 2:
        msg = f"Dockerfile line {instruction.line}: COPY needs at least one source and a destination"
        raise CheckError(msg)
    return flags, operands


def _workdir(current, instruction):
    _no_variables(instruction, [instruction.arguments])
    path = instruction.arguments.strip().strip('"')
    if not path:
        msg = f"Dockerfile line {instruction.line}: WORKDIR without a path"
        raise CheckError(msg)
    return posixpath.normpath(posixpath.join(current, path))


def copies(parsed):
    """The ``COPY`` instructions that read the build context, destinations made absolute.

    Parameters
    ----------
    parsed : list of Instruction
        From :func:`instructions`.

    Returns
    -------
    list of Copy

    Raises
    ------
    CheckError
        On ``ADD``, several stages, variables in paths or unsupported COPY flags.
    """
    workdir, stages, out = "/", 0, []
    for instruction in parsed:
        if instruction.keyword == "FROM":
            stages += 1
            if stages > 1:
                msg = (f"Dockerfile line {instruction.line}: a second FROM; multi-stage builds are not "
                       "supported by this check")
                raise CheckError(msg)
        elif instruction.keyword == "WORKDIR":
            workdir = _workdir(workdir, instruction)
        elif instruction.keyword == "ADD":
            msg = (f"Dockerfile line {instruction.line}: ADD is not supported by this check "
                   "(use COPY for files of the build context)")
            raise CheckError(msg)
        elif instruction.keyword == "COPY":
            flags, operands = _copy_operands(instruction)
            if any(flag.startswith("--from") for flag in flags):
                continue  # from another image or stage, not from the build context
            unsupported = [f for f in flags if not f.startswith(("--chown", "--chmod", "--link"))]
            if unsupported:
                msg = f"Dockerfile line {instruction.line}: COPY flags {unsupported} are not supported by this check"
                raise CheckError(msg)
            _no_variables(instruction, operands)
            *sources, destination = operands
            into_directory = (len(sources) > 1 or destination.endswith("/")
                              or posixpath.basename(destination) in (".", ".."))
            absolute = posixpath.normpath(posixpath.join(workdir, destination))
            out.append(Copy(instruction.line, tuple(sources), absolute, into_directory))
    return out


def final_workdir(parsed):
    """The ``WORKDIR`` in force at the end of the Dockerfile (``/`` when none is set)."""
    workdir = "/"
    for instruction in parsed:
        if instruction.keyword == "WORKDIR":
            workdir = _workdir(workdir, instruction)
    return workdir


def environment(parsed):
    """Variables set by ``ENV`` (``KEY=value`` pairs or the legacy ``ENV KEY value``), in order."""
    env = {}
    for instruction in parsed:
        if instruction.keyword != "ENV":
            continue
        tokens = shlex.split(instruction.arguments)
        if tokens and "=" not in tokens[0]:
            env[tokens[0]] = instruction.arguments.split(None, 1)[1] if len(tokens) > 1 else ""
            continue
        for token in tokens:
            key, sep, value = token.partition("=")
            if not sep:
                msg = f"Dockerfile line {instruction.line}: ENV item {token!r} is not KEY=value"
                raise CheckError(msg)
            env[key] = value
    return env


def _shell_words(command):
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def install_target(parsed):
    """The local path installed by the first ``RUN ... pip install <path>[extras]``.

    Parameters
    ----------
    parsed : list of Instruction

    Returns
    -------
    InstallTarget
        ``path`` is absolute in the image (resolved against the ``WORKDIR`` of the RUN).

    Raises
    ------
    CheckError
        When no RUN installs a local path (``.``, ``./x`` or ``/x``) with pip.
    """
    workdir = "/"
    for instruction in parsed:
        if instruction.keyword == "WORKDIR":
            workdir = _workdir(workdir, instruction)
        if instruction.keyword != "RUN":
            continue
        words = _shell_words(instruction.arguments)
        for index in range(len(words) - 1):
            if not (words[index] in ("pip", "pip3") or words[index].endswith("/pip")) or words[index + 1] != "install":
                continue
            for word in words[index + 2:]:
                if word in ("&&", "||", ";", "|", "&"):
                    break
                if word.startswith("-") or not word.startswith((".", "/")):
                    continue
                match = re.fullmatch(r"(?P<path>[^\[]+)(?:\[(?P<extras>[^\]]*)\])?", word)
                if not match:
                    continue
                _no_variables(instruction, [word])
                extras = tuple(e.strip() for e in (match.group("extras") or "").split(",") if e.strip())
                path = posixpath.normpath(posixpath.join(workdir, match.group("path")))
                return InstallTarget(instruction.line, path, extras)
    msg = "no RUN instruction of the Dockerfile runs `pip install` on a local path (`.`, `./dir` or `/dir`)"
    raise CheckError(msg)


def _ignore_rules(context):
    """``(regex, excluded)`` rules of ``context/.dockerignore`` (last match wins)."""
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excluded = not line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?|\[[^\]]+\])", pattern):
            if part.startswith("**"):
                regex += "(?:.*/)?" if part.endswith("/") else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("[") and part.endswith("]"):
                regex += part  # a character class, as in Go's filepath.Match
            else:
                regex += re.escape(part)
        rules.append((re.compile(regex + r"\Z"), excluded))
    return rules


def _ignored(relative, rules):
    """Whether ``relative`` (a POSIX path in the context) or a folder above it is excluded."""
    parts = relative.split("/")
    verdict = False
    for regex, excluded in rules:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            verdict = excluded
    return verdict


def _copy_tree(source, target, context, rules):
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(context).as_posix()
        if _ignored(relative, rules) or path.is_dir():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)


def assemble_context(dockerfile, context, root):
    """Copy what the Dockerfile's COPY lines bring in from ``context`` under ``root``.

    ``root`` plays the image's ``/``: ``COPY gpudiffim ./gpudiffim`` under
    ``WORKDIR /opt/gpudiffim`` puts the contents of ``context/gpudiffim`` in
    ``root/opt/gpudiffim/gpudiffim``, as Docker does.

    Parameters
    ----------
    dockerfile : path-like
    context : path-like
        The build context (``docker build`` 's last argument).
    root : path-like
        An empty or missing directory.

    Returns
    -------
    list of Instruction
        The parsed Dockerfile.

    Raises
    ------
    CheckError
        On a COPY source missing from the context (or excluded by ``.dockerignore``).
    """
    dockerfile, context, root = Path(dockerfile), Path(context).resolve(), Path(root)
    parsed = instructions(dockerfile.read_text())
    rules = _ignore_rules(context)
    for copy in copies(parsed):
        target = root / copy.destination.lstrip("/")
        matched = []
        for source in copy.sources:
            relative = posixpath.normpath(source).lstrip("/") or "."
            if relative == ".." or relative.startswith("../"):
                msg = f"Dockerfile line {copy.line}: COPY source {source!r} is outside the build context"
                raise CheckError(msg)
            found = [context / p for p in sorted(glob.glob(relative, root_dir=context))]
            found = [p for p in found if p == context or not _ignored(p.relative_to(context).as_posix(), rules)]
            if not found:
                msg = (f"Dockerfile line {copy.line}: COPY source {source!r} not found in the build context "
                       f"{context} (or excluded by .dockerignore)")
                raise CheckError(msg)
            matched.extend(found)
        into_directory = copy.into_directory or len(matched) > 1 or target.is_dir()
        for path in matched:
            if path.is_dir():
                _copy_tree(path, target, context, rules)
            else:
                destination = target / path.name if into_directory else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)
    return parsed


def _version_tuple(text):
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def build_requirements_installed(project, python=None):
    """Whether ``project``'s ``[build-system] requires`` are installed, so no build isolation is needed.

    Only requirements of the form ``name`` or ``name>=version`` are understood;
    anything else (or Python < 3.11, without :mod:`tomllib`, or another
    interpreter than this one) answers False, and pip then builds in isolation.
    """
    if python is not None and Path(python).resolve() != Path(sys.executable).resolve():
        return False
    try:
        import tomllib
    except ModuleNotFoundError:
        return False
    pyproject = Path(project) / "pyproject.toml"
    if not pyproject.is_file():
        return False
    requires = tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", [])
    for requirement in requires:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?\s*", requirement)
        if not match:
            return False
        try:
            installed = importlib.metadata.version(match.group(1))
        except importlib.metadata.PackageNotFoundError:
            return False
        if match.group(2) and _version_tuple(installed) < _version_tuple(match.group(2)):
            return False
    return True


def build_wheel(project, wheel_dir, *, isolation="auto", python=None):
    """Build the wheel of ``project`` with ``pip wheel --no-deps``; return its path.

    Parameters
    ----------
    project : path-like
        Folder with ``pyproject.toml``/``setup.cfg``.  setuptools writes
        ``build/`` and ``*.egg-info`` there: pass a copy, not a shared checkout.
    wheel_dir : path-like
    isolation : {"auto", True, False}
        ``False`` adds ``--no-build-isolation`` (no index needed: the build
        backend comes from ``python``'s environment); ``"auto"`` does so when
        :func:`build_requirements_installed`, else pip fetches setuptools and
        wheel from its index into an isolated environment.
    python : path-like, optional
        Interpreter whose pip builds (default: this one).

    Raises
    ------
    CheckError
        When pip fails (its output is in the message) or no wheel appears.
    """
    python = str(python or sys.executable)
    if isolation == "auto":
        isolation = not build_requirements_installed(project, python)
    wheel_dir = Path(wheel_dir)
    command = [python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(wheel_dir),
               str(project)]
    if not isolation:
        command.insert(4, "--no-build-isolation")
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        output = (run.stdout + run.stderr).strip()
        offline = re.search(r"satisfies the requirement (\S+) \(from versions: none\)", output)
        if isolation and offline and "install build dependencies did not run successfully" in output:
            msg = (f"pip found no {offline.group(1)} on its index to build {project} in isolation, and "
                   f"this environment lacks the build requirements: `pip install setuptools wheel` "
                   f"(then builds need no index)")
            raise BuildBackendUnavailable(msg)
        msg = (f"`{' '.join(command)}` failed (exit {run.returncode}); end of pip's output:\n"
               f"{output[-_PIP_TAIL:]}")
        raise CheckError(msg)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if len(wheels) != 1:
        msg = f"pip wheel succeeded but {wheel_dir} holds {len(wheels)} wheels, expected one: {wheels}"
        raise CheckError(msg)
    return wheels[0]


def wheel_problems(wheel, kernels=ROOT / "kernels"):
    """What the wheel lacks: one line per missing CUDA source or header; empty when complete.

    Parameters
    ----------
    wheel : path-like
    kernels : path-like
        The checkout's ``kernels/`` folder; each of its ``*.cu`` and ``*.cuh``
        must be in the wheel as ``gpudiffim/kernels/<name>``.
    """
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    kernels = Path(kernels)
    sources = sorted(kernels.iterdir()) if kernels.is_dir() else []
    expected = [f"gpudiffim/kernels/{p.name}" for p in sources if p.suffix in (".cu", ".cuh")]
    if not expected:
        return [f"no *.cu files in {kernels} to look for"]
    expected.append("gpudiffim/_cuda/emulator.h")
    return [f"{Path(wheel).name} lacks {name}" for name in expected if name not in names]


def check(dockerfile=ROOT / "Dockerfile", context=ROOT, work=None, *, isolation="auto"):
    """Assemble the context of ``dockerfile``, build its wheel, check the kernels are inside.

    Parameters
    ----------
    dockerfile, context : path-like
    work : path-like, optional
        Scratch folder (``<work>/image`` is the image's ``/``, ``<work>/dist``
        the wheel); a temporary one, removed afterwards, when not given.
    isolation : {"auto", True, False}
        See :func:`build_wheel`.

    Returns
    -------
    pathlib.Path
        The wheel (gone afterwards when ``work`` was not given).

    Raises
    ------
    CheckError
        With what is wrong: a COPY source missing, the build failing (as for a
        missing ``kernels/`` COPY: "package directory 'kernels' does not
        exist"), or the wheel lacking a kernel source.
    """
    if work is None:
        with tempfile.TemporaryDirectory(prefix="gpudiffim-docker-context-") as tmp:
            return check(dockerfile, context, tmp, isolation=isolation)
    work = Path(work)
    image = work / "image"
    parsed = assemble_context(dockerfile, context, image)
    target = install_target(parsed)
    project = image / target.path.lstrip("/")
    if not (project / "pyproject.toml").is_file() and not (project / "setup.py").is_file():
        msg = (f"Dockerfile line {target.line}: pip installs {target.path}, but the COPY lines put no "
               f"pyproject.toml or setup.py there (image files: {_listing(image)})")
        raise CheckError(msg)
    copied = _listing(project)
    try:
        wheel = build_wheel(project, work / "dist", isolation=isolation)
    except BuildBackendUnavailable:
        raise
    except CheckError as error:
        msg = (f"the wheel does not build from what the Dockerfile copies into {target.path} "
               f"(copied there: {copied}):\n{error}")
        raise CheckError(msg) from None
    problems = wheel_problems(wheel, Path(context) / "kernels")
    if problems:
        raise CheckError("the wheel built from the Dockerfile's context is incomplete:\n" + "\n".join(problems))
    return wheel


def _listing(folder, limit=12):
    names = sorted(p.relative_to(folder).as_posix() for p in Path(folder).iterdir()) if Path(folder).is_dir() else []
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") or "none"


def docker_engine_available(docker="docker"):
    """Whether ``docker info`` succeeds (a client and an engine that answers)."""
    executable = shutil.which(docker)
    if executable is None:
        return False
    try:
        run = subprocess.run([executable, "info"], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


def docker_build(dockerfile=ROOT / "Dockerfile", context=ROOT, tag="gpudiffim:ci", docker="docker"):
    """``docker build -f dockerfile -t tag context``; raises :class:`CheckError` on failure."""
    command = [docker, "build", "-f", str(dockerfile), "-t", tag, str(context)]
    print("running:", " ".join(command), flush=True)
    run = subprocess.run(command, check=False)
    if run.returncode != 0:
        msg = f"`{' '.join(command)}` failed (exit {run.returncode}); its output is above"
        raise CheckError(msg)


def main(argv=None):
    """Command line: the context check, then ``docker build`` where an engine answers; exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--context", type=Path, default=ROOT)
    parser.add_argument("--tag", default="gpudiffim:ci", help="image tag of the docker build (default gpudiffim:ci)")
    parser.add_argument("--no-docker-build", action="store_true", help="skip `docker build` even with an engine")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="gpudiffim-docker-context-") as tmp:
            wheel = check(args.dockerfile, args.context, tmp)
            with zipfile.ZipFile(wheel) as archive:
                kernels = sorted(n for n in archive.namelist() if n.startswith("gpudiffim/kernels/"))
            print(f"Docker context: {wheel.name} builds from the Dockerfile's COPY lines and holds "
                  f"{len(kernels)} kernel files: {', '.join(Path(n).name for n in kernels)}")
        if args.no_docker_build:
            print("docker build skipped (--no-docker-build)")
        elif docker_engine_available():
            docker_build(args.dockerfile, args.context, args.tag)
            print(f"docker build succeeded: {args.tag}")
        else:
            print("docker build skipped: no Docker engine answers `docker info` here")
    except CheckError as error:
        print(f"Docker context check FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
