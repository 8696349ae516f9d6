"""llama.cpp's converter: convert_hf_to_gguf.py, its `conversion/` package and its matching `gguf-py`.

They come from `--llama-cpp DIR` or $LLAMA_CPP_DIR, else from `<cache>/llama.cpp-src/llama-cpp-python-<version>/`,
else from the llama-cpp-python source distribution on PyPI, whose vendor/llama.cpp is unpacked into that cache
folder on first use.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

from kit import paths
from kit.errors import UserError

LLAMA_CPP_PYTHON = "0.3.36"  # the version the Makefile builds: its vendored llama.cpp both writes and runs our files
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# The argument table of every llama.cpp program (which flags llama-mtmd-cli and llama-server take): the printed
# commands are checked against it (tests/test_llama_commands.py)
SOURCE_PARTS = ("common/arg.cpp", "LICENSE")


def converter_cache() -> Path:
    from kit.paths import cache_dir

    return cache_dir() / "llama.cpp-src" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def sdist_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dest)]


def find_converter(llama_cpp_dir=None, fetch: bool = True) -> Path:
    """convert_hf_to_gguf.py: from --llama-cpp DIR or $LLAMA_CPP_DIR, the cache, or fetched from PyPI."""
    named = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if named:
        script = Path(named).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise UserError(f"{named} has no convert_hf_to_gguf.py: point --llama-cpp (or LLAMA_CPP_DIR) at a "
                            "llama.cpp checkout")
        return script
    cached = converter_cache() / "convert_hf_to_gguf.py"
    if cached.is_file():
        return cached
    why = "fetching was not allowed"
    if fetch:
        try:
            unpack_converter(download_sdist(), converter_cache())
            return cached
        except (OSError, tarfile.TarError) as error:
            why = str(error)
    raise UserError(
        "no llama.cpp converter (convert_hf_to_gguf.py) found; provide one of: --llama-cpp DIR or LLAMA_CPP_DIR=DIR "
        f"naming a llama.cpp checkout; {converter_cache()} holding convert_hf_to_gguf.py, conversion/ and gguf-py/ "
        f"from llama-cpp-python {LLAMA_CPP_PYTHON}'s vendor/llama.cpp; or network access to PyPI so the kit "
        f"fetches that source itself ({why})")


def llama_source(relative: str) -> Path:
    """A file of the pinned llama.cpp source (SOURCE_PARTS): unpacked beside the converter's cache on first use,
    from the same llama-cpp-python source distribution."""
    folder = converter_cache().with_name(f"{converter_cache().name}-sources")
    if not (folder / relative).is_file():
        unpack_converter(download_sdist(), folder, SOURCE_PARTS, relative)
    return folder / relative


def download_sdist() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="llama-cpp-python-sdist-"))
    click.echo(f"fetching llama.cpp's converter: llama-cpp-python=={LLAMA_CPP_PYTHON} source (77 MB) from PyPI")
    result = subprocess.run(sdist_download_command(folder), capture_output=True, text=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        shutil.rmtree(folder, ignore_errors=True)
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise OSError(f"pip download failed: {last}")
    return found[0]


def unpack_converter(tarball: Path, target: Path, parts: tuple = CONVERTER_PARTS,
                     required: str = "convert_hf_to_gguf.py"):
    """Only the converter's parts of the sdist's vendor/llama.cpp (2 MB of the 77; or other `parts`), renamed into
    place whole (a concurrent fetch that won keeps its copy, as good as ours)."""
    def extract(staging: Path):
        with tarfile.open(tarball) as archive:
            prefix = tarball.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
            members = []
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and relative.startswith(parts):
                    member.name = relative
                    members.append(member)
            archive.extractall(staging, members=members, filter="data")
        if not (staging / required).is_file():
            raise OSError(f"{tarball.name} has no vendor/llama.cpp/{required}")

    try:
        paths.build_dir(target, extract)
    finally:
        shutil.rmtree(tarball.parent, ignore_errors=True)
    click.echo(f"llama.cpp's {required} unpacked into {target}")
