"""SAE training: architectures (one module each), the run config, the pipeline, checkpoints.

from flashsae.train import RunConfig, load_sae, run
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flashsae")
except PackageNotFoundError:  # run from a source tree on the path (make gpu-check)
    __version__ = "0+source"

# The built-in architectures register themselves on import.
from . import batchtopk, gated, jumprelu, relu, topk  # noqa: E402, F401
from .checkpoint import load_sae, save_sae  # noqa: E402
from .config import RunConfig  # noqa: E402
from .pipeline import run  # noqa: E402

__all__ = ["RunConfig", "load_sae", "run", "save_sae"]
