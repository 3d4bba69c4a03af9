"""Loading the native CPU kernels from a damaged, foreign or unbuildable cache: the process survives,
computes what the torch paths compute, and warns at most once.

Each case runs in a subprocess (a damaged shared object kills the process that maps it) with
``NQKV_CACHE_DIR`` pointed at a temporary copy of this process's build, so most cases need no
compiler run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nqkv_core import native

pytestmark = pytest.mark.skipif(os.environ.get("NQKV_NATIVE") == "0", reason="native kernels disabled")

ROOT = Path(__file__).resolve().parents[1]

# Quantizes and dequantizes on the native path and on the torch path and prints what it found.
PROBE = r"""
import json, warnings
import torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from nqkv_core import native
    from nqkv_core.codebook import get_codebook
    from nqkv_core.quantize import dequantize_blockwise, quantize_blockwise
    cb = get_codebook("nf", 4, 64)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    out = [quantize_blockwise(x, cb, 64) for _ in range(2)]  # a second call must not fail or warn
    y = dequantize_blockwise(*out[0], cb, 64)
    with native.disabled():
        ref = quantize_blockwise(x, cb, 64)
        ref_y = dequantize_blockwise(*ref, cb, 64)
    same = all(torch.equal(a, b) for o in out for a, b in zip(o, ref)) and torch.equal(y, ref_y)
    available, isa = native.available(), native.vector_isa()
print(json.dumps({"same": same, "available": available, "isa": isa,
                  "warnings": [str(w.message) for w in caught if "nqkv" in str(w.message)]}))
"""


def _probe(cache: Path, cxx: str | None = None, wait: bool = True, **env_changes: str | None):
    env = {**os.environ, "NQKV_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if cxx is not None:
        env["CXX"] = cxx
    env.update({name: value for name, value in env_changes.items() if value is not None})
    for name in [name for name, value in env_changes.items() if value is None]:
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-c", PROBE], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return _result(proc) if wait else proc


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"the process died (return code {proc.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built() -> Path:
    """The directory of this process's build (built now if need be)."""
    assert native.available()
    return native._build(native._compiler()).parent


def _cached_copy(built: Path, cache: Path, cxx: str) -> Path:
    """Copies the build into ``cache`` where a process using ``cxx`` looks for it; returns the library."""
    dest = cache / native._build_dir(cxx)[0].name
    shutil.copytree(built, dest)
    (lib,) = dest.glob("*.so")
    return lib


def _text_section(data: bytes) -> tuple[int, int]:
    """(offset, size) of an ELF-64 file's .text section."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names = headers[names_index][4]
    return next((h[4], h[5]) for h in headers if data[names + h[0]:names + h[0] + 6] == b".text\0")


def _other_library(tmp_path: Path) -> Path:
    # a valid shared object with one of the kernels' names and none of the others
    src = tmp_path / "other.cpp"
    src.write_text('extern "C" int nqkv_vector_bits() { return 512; }\n')
    lib = tmp_path / "other.so"
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib


def _damage(lib: Path, how: str, tmp_path: Path) -> None:
    data = lib.read_bytes()
    if how == "truncated":
        lib.write_bytes(data[: len(data) // 2])
    elif how == "code-overwritten":  # int3 over the code: any call traps
        off, size = _text_section(data)
        lib.write_bytes(data[:off] + b"\xcc" * size + data[off + size:])
    elif how == "other-library-and-checksum":  # both files replaced: the checksum matches
        other = _other_library(tmp_path).read_bytes()
        lib.write_bytes(other)
        digest = hashlib.sha256(other).hexdigest()
        (lib.parent / f"{native.LIB_NAME}.sha256").write_text(f"{digest}  {lib.name}\n")


@pytest.mark.skipif(sys.platform != "linux", reason="ELF shared objects")
def test_foreign_library_is_rebuilt(built, tmp_path):
    # Another shared object in the library's place, with a checksum file that matches it: it loads,
    # lacks the kernels' functions, and a new library is built under a new name (a damaged one is
    # rebuilt too: test_concurrent_builds)
    lib = _cached_copy(built, tmp_path / "cache", native._compiler())
    _damage(lib, "other-library-and-checksum", tmp_path)
    r = _probe(tmp_path / "cache")
    assert r["available"] and r["same"] and r["isa"] != "none", r
    assert r["warnings"] == [], r  # a cache repaired silently
    rebuilt = native._verified(lib.parent)
    assert rebuilt is not None and rebuilt != lib


@pytest.fixture
def failing_cxx(tmp_path) -> str:
    cxx = tmp_path / "failing-cxx"
    cxx.write_text("#!/bin/sh\necho 'failing-cxx: error: cannot compile here' >&2\nexit 1\n")
    cxx.chmod(0o755)
    return str(cxx)


@pytest.mark.skipif(sys.platform != "linux", reason="ELF shared objects")
@pytest.mark.parametrize("how", ["empty-cache", "code-overwritten", "other-library-and-checksum"])
def test_unbuildable_library_falls_back_to_torch_with_one_warning(built, tmp_path, failing_cxx, how):
    if how != "empty-cache":
        _damage(_cached_copy(built, tmp_path / "cache", failing_cxx), how, tmp_path)
    r = _probe(tmp_path / "cache", cxx=failing_cxx)
    assert not r["available"] and r["same"] and r["isa"] == "none", r
    assert len(r["warnings"]) == 1, r
    # the warning quotes the compiler and says how to fix it
    for part in ("failing-cxx: error: cannot compile here", "build.log", "g++", "NQKV_NATIVE=0"):
        assert part in r["warnings"][0], r


@pytest.mark.parametrize("case", ["no-compiler", "disabled"])
def test_no_compiler_warns_once_and_disabled_not_at_all(tmp_path, case):
    env = {"CXX": None, "PATH": str(tmp_path)} if case == "no-compiler" else {"NQKV_NATIVE": "0"}
    r = _probe(tmp_path / "cache", **env)
    assert not r["available"] and r["same"] and r["isa"] == "none", r
    if case == "disabled":
        assert r["warnings"] == [], r
    else:
        assert len(r["warnings"]) == 1 and "no C++ compiler" in r["warnings"][0], r
        assert "NQKV_NATIVE=0" in r["warnings"][0], r
    assert not (tmp_path / "cache").exists()  # nothing built, nothing written


def test_concurrent_builds(built, tmp_path):
    # Two processes finding a truncated library (no valid build: as for a first build) rebuild it at
    # once; both load a whole library, and the cache ends with one checksum file that matches the
    # library it names and no temporary files.
    cache = tmp_path / "cache"
    _damage(_cached_copy(built, cache, native._compiler()), "truncated", tmp_path)
    results = [_result(p) for p in [_probe(cache, wait=False) for _ in range(2)]]
    for r in results:
        assert r["available"] and r["same"] and r["warnings"] == [], r
    (build_dir,) = cache.iterdir()
    assert native._verified(build_dir) is not None
    assert not [p.name for p in build_dir.iterdir() if p.name.startswith(".")]
