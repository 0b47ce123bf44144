"""llama.cpp for the benchmarks: llama-cpp-python built from source in a venv of its own, with llama-quantize and
llama-imatrix. Shared by engines.py, gguf_logits.py and gguf_tokenization.py; llama-cpp-python is not a moeslim
dependency."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
# llama-cpp-python's CMake project, configured once with llama.cpp's tools: only the targets used here are built
# (the library and llama-quantize / llama-imatrix; not mtmd, the server or the other tools: 2 cores are slow).
_CMAKE_COMMON = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
_TARGETS = ("llama", "llama-quantize", "llama-imatrix")


def _run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False).returncode
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [line for line in lines if "error" in line.lower()][-10:] or lines[-10:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); see {log}:\n" + "\n".join(errors))


# -- the llama.cpp environment ------------------------------------------------------------------------------

def _venv_ok(venv: Path) -> bool:
    python = venv / "bin" / "python"
    return python.is_file() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True,
                                               check=False).returncode == 0


def _tool(build: Path, name: str) -> Path | None:
    found = sorted(p for p in build.rglob(name) if p.is_file() and os.access(p, os.X_OK))
    return found[0] if found else None


def ensure_llama_env(work: Path) -> tuple[Path, Path, Path]:
    """(venv python, llama-quantize, llama-imatrix) in WORK: builds llama-cpp-python from source when missing.

    1. ``pip download`` the llama-cpp-python sdist and unpack it (WORK/src); 2. configure its CMake project
    with llama.cpp's tools and build only the library, llama-quantize and llama-imatrix (WORK/build, nice 19);
    3. ``pip install`` that source into WORK/venv with the same build folder (tools off: nothing is rebuilt).
    """
    venv, build, src = work / "venv", work / "build", work / "src"
    quantize, imatrix = _tool(build, "llama-quantize"), _tool(build, "llama-imatrix")
    if _venv_ok(venv) and quantize and imatrix:
        return venv / "bin" / "python", quantize, imatrix
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source into {venv} (log: {log}); this takes "
          "10+ minutes on 2 cores", flush=True)
    if not (venv / "bin" / "python").is_file():
        _run_logged([sys.executable, "-m", "venv", str(venv)], log)
    pip = str(venv / "bin" / "pip")
    if not (src / "CMakeLists.txt").is_file():
        _run_logged([pip, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                     "-d", str(work / "sdist")], log)
        archive = next((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
        _run_logged(["tar", "xzf", str(archive), "-C", str(work)], log)
        (work / archive.name.removesuffix(".tar.gz")).rename(src)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    _run_logged(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DLLAMA_BUILD_TOOLS=ON", *_CMAKE_COMMON],
                log, env)
    _run_logged(["nice", "-n", "19", "cmake", "--build", str(build), "-j", "2", "--target", *_TARGETS], log, env)
    env["CMAKE_ARGS"] = " ".join(["-DLLAMA_BUILD_TOOLS=OFF", *_CMAKE_COMMON])
    _run_logged(["nice", "-n", "19", pip, "install", "-v", f"--config-settings=build-dir={build}", str(src)], log,
                env)
    quantize, imatrix = _tool(build, "llama-quantize"), _tool(build, "llama-imatrix")
    if not (_venv_ok(venv) and quantize and imatrix):
        raise SystemExit(f"llama.cpp environment incomplete after the build; see {log}")
    return venv / "bin" / "python", quantize, imatrix
