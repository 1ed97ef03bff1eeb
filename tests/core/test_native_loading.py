"""How attnlab.core.native finds, chooses and checks its compiled libraries: one variant
per instruction set chosen from the processor's flags (never one it cannot run),
ATTNLAB_NATIVE_ISA, the ABI version that refuses stale builds, describe() and summary(),
and the Makefile rules that build the variants."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.core import native
from attnlab.core.errors import AttnInputError

from .test_native import NOTHING_BUILT, needs_library

ROOT = Path(__file__).resolve().parents[2]
COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason=NOTHING_BUILT)

V3 = native.ISA_FLAGS["avx2"]
V4 = native.ISA_FLAGS["avx512"]
OLD_X86 = frozenset({"sse", "sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx"})
# what the processors of the issue report: AMD EPYC with and without AVX-512 (Zen 2-3, 4)
ZEN3 = OLD_X86 | V3 | {"sha_ni", "vaes"}
ZEN4 = ZEN3 | V4 | {"avx512_bf16", "avx512vnni"}
ARM = frozenset({"fp", "asimd", "evtstrm", "aes", "crc32"})

# a stand-in library: every symbol native.py declares; attnlab_cpu_level returns MARK so a
# test can tell which file was loaded; the kernels answer "bad arguments" if ever called
FAKE_LIBRARY = """
#ifndef NO_VERSION
int attnlab_abi_version(void) { return VERSION; }
#endif
int attnlab_cpu_level(void) { return MARK; }
int attnlab_causal_scan(void) { return 2; }
int attnlab_based(void) { return 2; }
int attnlab_moba(void) { return 2; }
"""


def build_fake(path: Path, *, version: int | None, mark: int = 0) -> Path:
    """Compile FAKE_LIBRARY into ``path`` (version None: no attnlab_abi_version)."""
    source = path.with_suffix(".c")
    source.write_text(FAKE_LIBRARY)
    defines = ["-DNO_VERSION" if version is None else f"-DVERSION={version}", f"-DMARK={mark}"]
    subprocess.run(
        [COMPILER, "-shared", "-fPIC", *defines, "-o", str(path), str(source)], check=True
    )
    return path


@pytest.fixture
def library_dir(tmp_path, monkeypatch):
    """native looks for its libraries in an empty temporary folder (restored after)."""
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    native.reset()
    yield tmp_path
    monkeypatch.undo()
    native.reset()


@pytest.mark.parametrize(
    "flags,built,expected",
    [
        (ZEN4, ["avx512", "avx2"], ["avx512", "avx2"]),  # AVX-512 first
        (ZEN3, ["avx512", "avx2"], ["avx2"]),  # never a variant the processor cannot run
        (ZEN4 - {"avx512bw"}, ["avx512", "avx2"], ["avx2"]),  # all of x86-64-v4, or not
        (OLD_X86, ["avx512", "avx2"], []),  # before AVX2: the PyTorch paths
        (ZEN3, ["avx512"], []),
        (ZEN4, ["avx2"], ["avx2"]),
        (ARM, ["generic"], ["generic"]),
        (ARM, ["avx2"], []),  # an x86 build in a home folder shared with an Arm machine
        (None, ["avx2", "generic"], ["generic"]),  # flags unknown: only what needs none
    ],
    ids=["zen4", "zen3", "v4-incomplete", "pre-avx2", "only-avx512", "only-avx2", "arm",
         "arm-x86-build", "unknown"],
)  # fmt: skip
def test_the_chooser_takes_the_best_variant_the_processor_runs(flags, built, expected):
    assert native.choose_variant(built, flags) == expected


def test_a_forced_variant_is_checked_against_the_processor():
    """ATTNLAB_NATIVE_ISA picks one variant; an error where it cannot run, is not built or
    is unknown (naming the variable and what is missing)."""
    assert native.choose_variant(["avx512", "avx2"], ZEN4, "avx2") == ["avx2"]
    assert native.choose_variant(["avx2"], None, "avx2") == ["avx2"]  # flags unknown: trusted
    with pytest.raises(AttnInputError, match=r"ATTNLAB_NATIVE_ISA: .*avx512.*avx512bw"):
        native.choose_variant(["avx512", "avx2"], ZEN3, "avx512")
    with pytest.raises(AttnInputError, match=r"ATTNLAB_NATIVE_ISA: .*not built: run `make"):
        native.choose_variant(["avx2"], ZEN4, "avx512")
    with pytest.raises(AttnInputError, match=r"ATTNLAB_NATIVE_ISA: expected one of .*'sse9'"):
        native.choose_variant(["avx2"], ZEN4, "sse9")


def test_abi_version_is_the_one_the_c_source_returns():
    source = (ROOT / "csrc" / "library.c").read_text()
    assert re.search(r"#define ATTNLAB_ABI_VERSION (\d+)", source)[1] == str(native.ABI_VERSION)


@needs_compiler
@pytest.mark.parametrize("version", [native.ABI_VERSION - 1, native.ABI_VERSION + 7, None])
def test_a_stale_library_is_refused_with_make_native_and_never_called(library_dir, version):
    """A library of another ABI version (or none) is refused with one warning that says to
    run `make native`; describe() and summary() say so; the mechanisms take their PyTorch
    paths (the stand-in's kernels would raise if called)."""
    best = native.choose_variant(list(native.ISA_FLAGS), native.cpu_flags())[0]
    build_fake(library_dir / f"_native_{best}.so", version=version)
    with pytest.warns(RuntimeWarning, match=r"stale build .*run `make native`"):
        assert native.library() is None
    info = native.describe()
    assert info == {
        "built": True,
        "enabled": False,
        "isa": None,
        "variants": [best],
        "abi": native.ABI_VERSION,
    }
    assert "refused" in native.summary() and "run `make native`" in native.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        assert native.open_library(native.library_path(best)) is None
        q = torch.randn(1, 2, 64, 16)
        with torch.no_grad():
            out = attnlab.get("moba", block=16, top_k=2)(q, q, q, causal=True)
        assert torch.isfinite(out).all()
    with pytest.raises(AttnInputError, match="stale build"), native.use_variant(best):
        pass


@needs_compiler
def test_the_single_library_of_older_checkouts_is_refused(library_dir):
    """`_native.so` (before the variants, no ABI version) left by an older build."""
    build_fake(library_dir / native.LEGACY_LIBRARY, version=None)
    with pytest.warns(RuntimeWarning, match=r"_native.so is a stale build .*`make native`"):
        assert native.library() is None
    assert native.describe()["built"] and not native.describe()["enabled"]
    assert "_native.so" in native.summary()


@needs_compiler
def test_the_loader_takes_the_variant_the_flags_allow(library_dir, monkeypatch):
    """With both variants built (stand-ins, told apart by attnlab_cpu_level), the processor's
    flags decide, and ATTNLAB_NATIVE_ISA overrides within what it runs."""
    build_fake(library_dir / "_native_avx2.so", version=native.ABI_VERSION, mark=3)
    build_fake(library_dir / "_native_avx512.so", version=native.ABI_VERSION, mark=4)
    for flags, isa, mark in [(ZEN4, "avx512", 4), (ZEN3, "avx2", 3)]:
        monkeypatch.setattr(native, "cpu_flags", lambda flags=flags: flags)
        native.reset()
        assert native.describe()["isa"] == isa and native.library().attnlab_cpu_level() == mark
        assert native.summary() == f"native kernels: {isa} (abi {native.ABI_VERSION})"
    assert native.describe()["variants"] == ["avx2"]
    monkeypatch.setattr(native, "cpu_flags", lambda: OLD_X86)
    native.reset()
    assert native.library() is None and native.describe()["built"]
    assert "runs on this processor" in native.summary()
    monkeypatch.setattr(native, "cpu_flags", lambda: ZEN4)
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    native.reset()
    assert native.describe()["isa"] == "avx2" and native.library().attnlab_cpu_level() == 3
    monkeypatch.setattr(native, "cpu_flags", lambda: ZEN3)
    monkeypatch.setenv(native.ISA_ENV, "avx512")
    native.reset()
    with pytest.raises(AttnInputError, match="ATTNLAB_NATIVE_ISA"):
        native.library()


def test_nothing_built_says_so(library_dir):
    assert native.library() is None and not native.enabled()
    assert native.describe() == {
        "built": False,
        "enabled": False,
        "isa": None,
        "variants": [],
        "abi": native.ABI_VERSION,
    }
    assert native.summary() == "native kernels: not built (pure PyTorch; run `make native`)"


@needs_library
def test_describe_and_summary_name_the_running_variant():
    info = native.describe()
    assert set(info) == {"built", "enabled", "isa", "variants", "abi"}
    assert info["isa"] == native.variants()[0] and info["enabled"]
    assert native.summary() == f"native kernels: {info['isa']} (abi {native.ABI_VERSION})"
    with native.disabled():
        assert "switched off" in native.summary() and native.describe()["isa"] is None


@needs_library
def test_use_variant_takes_only_what_this_processor_runs():
    for isa in native.variants():
        with native.use_variant(isa):
            assert native.describe()["isa"] == isa
    not_here = [isa for isa in native.ISA_FLAGS if isa not in native.variants()]
    for isa in [*not_here, "sse9"]:
        with (
            pytest.raises(AttnInputError, match=r"^isa: expected a built variant"),
            native.use_variant(isa),
        ):
            pass


@needs_library
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not native.CPUINFO.exists(), reason="no cpuinfo"
)
def test_the_compiled_cpu_probe_agrees_with_proc_cpuinfo(monkeypatch, tmp_path):
    """Where /proc/cpuinfo is missing (macOS), the library's attnlab_cpu_level tells: here
    it names the same best variant as the flags Linux lists."""
    flags = native.cpu_flags()
    monkeypatch.setattr(native, "CPUINFO", tmp_path / "missing")
    probed = native.cpu_flags()
    for isa in ("avx512", "avx2"):
        assert native.runnable(isa, probed) == native.runnable(isa, flags), isa


def _make(*args: str) -> str:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True
    ).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_native_builds_every_variant_portably_and_clean_removes_them():
    """`make native` rebuilds each variant when a csrc file changes, with the instruction
    set's own flags (never -march=native, which builds for one processor); `make clean`
    removes the libraries."""
    dry_run = _make("-n", "-W", "csrc/scan.c", "native")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = ["avx2", "avx512"] if x86 else ["generic"]
    for isa in expected:
        assert f"_native_{isa}.so" in dry_run
    assert "-march=native" not in dry_run
    assert "src/attnlab/core/_native*.so" in _make("-n", "clean")


@needs_compiler
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_every_variant_the_compiler_can_build_is_built():
    """The AVX-512 variant exists wherever the compiler can target it,
    even on a processor that cannot run it (read, never loaded here)."""
    if not native.describe()["built"]:
        pytest.skip(NOTHING_BUILT)
    for isa in ("avx2", "avx512"):
        flags = _make("-s", "--eval", "isa-flags-%: ; @echo $(NATIVE_ISA_$*)", f"isa-flags-{isa}")
        probe = subprocess.run(
            [COMPILER, *flags.split(), "-x", "c", "-c", "-o", "/dev/null", "-"],
            input="typedef float v16 __attribute__((vector_size(64)));\n"
            "v16 f(v16 a, v16 b) { return a * b + a; }\n",
            text=True,
            capture_output=True,
        )
        if probe.returncode != 0:
            continue
        path = native.library_path(isa)
        assert path.exists(), f"run `make native`: {path.name} missing"
        assert b"attnlab_abi_version" in path.read_bytes()
