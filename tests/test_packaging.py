"""One import package, `trifuse`: the wheel's contents, and living beside other packages.

The repository keeps engine/, kernels/, export/ and bench/ at its root; the build maps them
into ``trifuse.*``. These tests build the real wheel and import things the way users and
other libraries do, each in a fresh interpreter.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd: str = REPO, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=300)


def test_wheel_holds_only_the_trifuse_package(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(REPO, name)):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("trifuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert len(tops) == 2 and "trifuse" in tops, tops  # trifuse/ and its .dist-info, nothing else
    (dist_info,) = tops - {"trifuse"}
    assert dist_info.startswith("trifuse-") and dist_info.endswith(".dist-info")
    for module in ("trifuse/__init__.py", "trifuse/cli.py", "trifuse/kernels/attention.py",
                   "trifuse/engine/models/t5.py", "trifuse/export/onnx.py", "trifuse/bench/suite.py"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "trifuse = trifuse.cli:main" in entry_points


def test_import_trifuse_loads_no_kernel():
    """`import trifuse` is cheap and leaves TRITON_INTERPRET to be set afterwards."""
    out = _python("import sys, trifuse; print(trifuse.__version__);"
                  "print(any(m.startswith(('trifuse.kernels', 'triton', 'torch')) for m in sys.modules))")
    assert out.returncode == 0, out.stderr
    version, loaded = out.stdout.split()
    assert version.count(".") == 2 and loaded == "False"


def test_public_api_and_subpackages():
    out = _python("import trifuse\n"
                  "from trifuse import kernels, engine, export\n"
                  "from trifuse.kernels import attention, layer_norm\n"
                  "assert trifuse.from_pretrained is engine.from_pretrained\n"
                  "assert trifuse.kernels is kernels and callable(attention) and callable(layer_norm)\n"
                  "assert callable(trifuse.export.to_onnx)\n"
                  "try:\n    trifuse.nope\nexcept AttributeError as e:\n    print(e)\n")
    assert out.returncode == 0, out.stderr
    assert "no attribute 'nope'" in out.stdout


def test_hugging_face_kernels_package_and_ours_side_by_side():
    """Hugging Face's `kernels` (the kernel hub) and `trifuse.kernels` both import, even from the
    repository root where our kernels/ folder shadows the name, and the trifuse:: ops are registered
    once (transformers probes `kernels` by importing it)."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    code = ("import sys, torch, transformers, kernels, trifuse.kernels as ours\n"
            "from transformers.integrations import hub_kernels  # imports from `kernels` when available\n"
            "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "assert callable(kernels.get_kernel)\n"
            "assert ours.__name__ == 'trifuse.kernels'\n"
            "assert not [m for m in sys.modules if m.startswith('kernels.') and 'trifuse' in str(getattr(sys.modules[m], '__file__', ''))]\n"  # noqa: E501
            "x = torch.randn(3, 8)\n"
            "torch.testing.assert_close(ours.layer_norm(x), ours.layer_norm_reference(x))\n"
            "print('ok')")
    for cwd in (REPO, "/"):
        out = _python(code, cwd=cwd)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (cwd, out.stderr[-2000:])


def test_source_folder_under_a_bare_name_stands_aside():
    """Imported as `bench` (no other package of that name installed), our folder is an empty
    module with no version, which a package probe reads as absent, and it names the real path."""
    code = ("import importlib.util, sys\n"
            "if importlib.util.find_spec('bench') is None or 'site-packages' in (importlib.util.find_spec('bench').origin or ''):\n"  # noqa: E501
            "    print('skip'); sys.exit()\n"
            "import bench\n"
            "assert getattr(bench, '__version__', 'N/A') == 'N/A'\n"
            "try:\n    bench.cli\nexcept AttributeError as e:\n    print(e)\n")
    out = _python(code, PYTHONPATH=REPO)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() != "skip":
        assert "use 'trifuse.bench'" in out.stdout
