"""The Docker image's COPY lines bring in everything the wheel needs (issue 14).

``.ci/check_docker_context.py`` rebuilds the image's build context from the
``Dockerfile``'s COPY lines and builds the wheel from it; these tests run its
functions on the real ``Dockerfile`` (one wheel build, shared), on one that
lacks the ``kernels/`` COPY (must fail, as the image build did), and on small
hand-written Dockerfiles for the parsing rules.  Builds fail the tests; they
skip only when no build backend can be had at all (not installed, and pip's
index offline), which is :class:`BuildBackendUnavailable`.
"""

import zipfile
from pathlib import Path

import pytest
from conftest import ci_checker

ROOT = Path(__file__).resolve().parent.parent


checker = ci_checker()


def _check(dockerfile, work):
    try:
        return checker.check(dockerfile, ROOT, work)
    except checker.BuildBackendUnavailable as error:
        pytest.skip(f"build tools unavailable offline: {error}")


@pytest.fixture(scope="module")
def context_wheel(tmp_path_factory):
    """The wheel built from the real Dockerfile's context (the check itself)."""
    return _check(ROOT / "Dockerfile", tmp_path_factory.mktemp("docker-context"))


def test_real_dockerfile_parses():
    parsed = checker.instructions((ROOT / "Dockerfile").read_text())
    copied = {(source, copy.destination) for copy in checker.copies(parsed) for source in copy.sources}
    assert ("kernels", "/opt/gpudiffim/kernels") in copied
    assert ("gpudiffim", "/opt/gpudiffim/gpudiffim") in copied
    target = checker.install_target(parsed)
    assert target.path == "/opt/gpudiffim"
    assert {"cuda12x", "plot"} <= set(target.extras)


def test_real_dockerfile_runs_as_any_user():
    """Writable HOME, caches and matplotlib folder for ``docker run --user "$(id -u):$(id -g)"``."""
    parsed = checker.instructions((ROOT / "Dockerfile").read_text())
    env = checker.environment(parsed)
    assert env["HOME"] == "/tmp"
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert env["CUPY_CACHE_DIR"].startswith("/cache/") and env["GPUDIFFIM_CACHE_DIR"].startswith("/cache/")
    assert checker.final_workdir(parsed) == "/data"
    run = " ".join(i.arguments for i in parsed if i.keyword == "RUN")
    assert "chmod 1777 /cache /data" in run


@pytest.mark.slow
def test_real_dockerfile_context_builds_wheel_with_kernels(context_wheel):
    assert checker.wheel_problems(context_wheel, ROOT / "kernels") == []
    with zipfile.ZipFile(context_wheel) as archive:
        names = set(archive.namelist())
    assert {f"gpudiffim/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.cu")} <= names
    assert "gpudiffim/cli.py" in names


@pytest.mark.slow
def test_dockerfile_without_kernels_copy_fails(tmp_path):
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    broken = [line for line in lines if not line.startswith("COPY kernels")]
    assert len(broken) == len(lines) - 1
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("\n".join(broken) + "\n")
    with pytest.raises(checker.CheckError, match="package directory 'kernels' does not exist"):
        _check(dockerfile, tmp_path / "work")


def test_wheel_problems_names_missing_kernel(tmp_path):
    wheel = tmp_path / "x-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gpudiffim/kernels/warp.cu", "")
        archive.writestr("gpudiffim/_cuda/emulator.h", "")
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "warp.cu").write_text("")
    (kernels / "stamp_fit.cu").write_text("")
    assert checker.wheel_problems(wheel, kernels) == [f"{wheel.name} lacks gpudiffim/kernels/stamp_fit.cu"]


def _context(tmp_path):
    context = tmp_path / "context"
    for name in ("a.txt", "b.txt", "pkg/mod.py", "pkg/sub/data.cu", "pkg/skip.pyc", "notes/x.md"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(name)
    return context


def test_copy_semantics(tmp_path):
    """WORKDIR-relative destinations, directories copied by content, files into a folder or renamed."""
    context = _context(tmp_path)
    (context / ".dockerignore").write_text("# comment\n**/*.pyc\nnotes\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM scratch\n"
        "WORKDIR /opt\n"
        "WORKDIR app\n"
        "COPY a.txt \\\n"
        "    # a comment inside the continuation\n"
        "    b.txt ./\n"
        "COPY --chown=1000 pkg ./pkg\n"
        'COPY ["a.txt", "/etc/renamed.txt"]\n'
        "COPY --from=builder /x /y\n"
        "COPY *.txt sub/\n")
    image = tmp_path / "image"
    checker.assemble_context(tmp_path / "Dockerfile", context, image)
    files = sorted(p.relative_to(image).as_posix() for p in image.rglob("*") if p.is_file())
    assert files == ["etc/renamed.txt", "opt/app/a.txt", "opt/app/b.txt", "opt/app/pkg/mod.py",
                     "opt/app/pkg/sub/data.cu", "opt/app/sub/a.txt", "opt/app/sub/b.txt"]


def test_install_target_resolves_workdir():
    parsed = checker.instructions("FROM x\nWORKDIR /src\n"
                                  "RUN python -m pip install --no-cache-dir './proj[a, b]' && true\n")
    assert checker.install_target(parsed) == checker.InstallTarget(3, "/src/proj", ("a", "b"))


@pytest.mark.parametrize(("dockerfile", "message"), [
    ("FROM x\nCOPY missing.txt /\n", "COPY source 'missing.txt' not found"),
    ("FROM x\nCOPY notes /\n", "COPY source 'notes' not found"),  # excluded by .dockerignore
    ("FROM x\nCOPY ../a.txt /\n", "outside the build context"),
    ("FROM x\nADD a.txt /\n", "ADD is not supported"),
    ("FROM x\nCOPY $SRC /\n", "does not expand ARG/ENV variables"),
    ("FROM x\nFROM y\n", "multi-stage builds are not supported"),
    ("FROM x\nRUN pip install numpy\n", "runs `pip install` on a local path"),
    ("FROM x\nCOPY a.txt \\\n", "ends inside the instruction started on line 2"),
])
def test_unsupported_or_broken_dockerfiles_are_errors(tmp_path, dockerfile, message):
    context = _context(tmp_path)
    (context / ".dockerignore").write_text("notes/\n")
    (tmp_path / "Dockerfile").write_text(dockerfile)
    with pytest.raises(checker.CheckError, match=message.replace("(", r"\(").replace("$", r"\$")):
        checker.check(tmp_path / "Dockerfile", context, tmp_path / "work")


def test_build_failure_is_an_error(tmp_path):
    """pip's own error reaches the message (no skip)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=64"]\n'
                                            'build-backend = "no_such_backend_module"\n')
    with pytest.raises(checker.CheckError, match="no_such_backend_module"):
        checker.build_wheel(project, tmp_path / "dist", isolation=False)
