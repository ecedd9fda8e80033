"""The Python execution environment of the Triton tokenizer models (numpy 1 + tokenizers).

The python backend stub of the nvidia-pytriton wheel (Triton 2.51) is built against numpy 1's C
layout. Under numpy 2 it copies a BYTES (string) input with zero strides, every byte equal to the
first, and the stub aborts while deserialising it, before the model sees the request (measured: a
batch of "hello world" read as a first length of 0x0B0B0B0B). Numeric inputs are fine (model.py
reads them through DLPack), so only the tokenizer models, which take strings, run in this
environment: their config names it in EXECUTION_ENV_PATH, Triton's own mechanism for a model's
Python environment (an unpacked folder with bin/activate).

    python -m drscaling.serving.stub_env            # create it (make setup does); pip, from the registry
    DRSCALING_TRITON_STUB_ENV=/path                 # use another location

Relocatable repositories: the config does not name the environment's absolute path (a repository
copied to another folder or checkout would break, and the exported bytes would depend on where the
checkout lives). It names `$$TRITON_MODEL_DIRECTORY/1/python-env`, a folder inside the model holding
only `bin/activate`, a shim (`activate_shim()`) that the python backend sources before starting the
stub and that activates the environment named by $DRSCALING_TRITON_STUB_ENV, resolved when the server
starts: `TritonServer` sets it (to `stub_env_path()`); set it yourself to run tritonserver by hand.
(Measured with Triton 2.51 here: `$$TRITON_MODEL_DIRECTORY` is expanded in EXECUTION_ENV_PATH, an
unpacked environment needs only bin/activate, and with the variable unset the stub never starts and
the model times out, the shim's message in the server log.)

The pins are requirements-triton-stub.txt, plus the venv's own `tokenizers` version, so the
server tokenises as the client does.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import venv
from pathlib import Path

from drscaling.errors import DrscalingError
from drscaling.params import REPO

ENV_VAR = "DRSCALING_TRITON_STUB_ENV"
REQUIREMENTS = REPO / "requirements-triton-stub.txt"
PYTHON_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"
SHIM_DIR = "python-env"  # inside the tokenizer model's version folder
EXECUTION_ENV_PATH = f"$$TRITON_MODEL_DIRECTORY/1/{SHIM_DIR}"  # what its config.pbtxt names


def stub_env_path() -> Path:
    """Where the environment lives: $DRSCALING_TRITON_STUB_ENV, else triton-stub-env in this venv."""
    return Path(os.environ.get(ENV_VAR) or Path(sys.prefix) / "triton-stub-env").resolve()


def _site_packages(path: Path) -> Path:
    return path / "lib" / PYTHON_DIR / "site-packages"


def check_stub_env(path: Path | None = None) -> Path:
    """The environment's path, after checking it is complete; a clear error naming the fix if not."""
    path = path or stub_env_path()
    site = _site_packages(path)
    missing = [p for p in (path / "bin" / "activate", site / "numpy", site / "tokenizers") if not p.exists()]
    if missing:
        raise DrscalingError(
            f"the Triton tokenizer models' Python environment at {path} is missing or incomplete "
            f"(no {missing[0]}): create it with `python -m drscaling.serving.stub_env` (`make setup` "
            f"does), point {ENV_VAR} at one, or build the repository without the text ensembles "
            "(params.yaml serving.text_ensemble: false)"
        )
    return path


def activate_shim() -> str:
    """`<model>/1/python-env/bin/activate`: activates $DRSCALING_TRITON_STUB_ENV (sourced by bash)."""
    return f"""# The drscaling tokenizer model's Python environment (numpy 1 + tokenizers), found when the server
# starts so that the repository can move: drscaling's TritonServer sets {ENV_VAR};
# set it yourself to start tritonserver by hand (python -m drscaling.serving.stub_env makes one).
if [ -z "${{{ENV_VAR}:-}}" ] || [ ! -f "${ENV_VAR}/bin/activate" ]; then
    echo "drscaling tokenizer model: {ENV_VAR} ('${{{ENV_VAR}:-}}') is not a Python environment;" \
         "set it to the one python -m drscaling.serving.stub_env makes" >&2
    return 1
fi
. "${ENV_VAR}/bin/activate"
"""


def uses_stub_env(repo_dir: Path) -> bool:
    """Whether a model repository holds a model that activates the shim (a tokenizer model)."""
    return any(repo_dir.glob(f"*/1/{SHIM_DIR}/bin/activate"))


def create_stub_env(path: Path | None = None) -> Path:
    """A venv of the running interpreter's Python (no pip inside) with the pinned packages."""
    path = path or stub_env_path()
    venv.EnvBuilder(clear=True, with_pip=False).create(path)
    # The client's own tokenizers version, so the server tokenises exactly as the client does
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(_site_packages(path)), "-r", str(REQUIREMENTS),
           f"tokenizers=={importlib.metadata.version('tokenizers')}"]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise DrscalingError(f"installing {REQUIREMENTS.name} into {path} failed (see pip's output above)")
    return check_stub_env(path)


if __name__ == "__main__":
    print(f"Triton tokenizer environment ready: {create_stub_env()}")
