"""RemoteGPU Image: the top of the project, above the components.

`cli` (the `remotegpu` command), `embedded` (the embedded default: gateway and workers in
one process) and `client` (the Python client). The shared base the components speak
lives below them in `remotegpu_base`.
"""

from remotegpu_base import __version__

__all__ = ["__version__"]
