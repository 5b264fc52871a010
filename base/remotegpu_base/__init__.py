"""The shared base: what the gateway, the worker and the operator all speak.

`catalog` (the ImageModel schema, mirroring the CRD, and the bundled models file),
`protocol` (the internal worker API) and `config` (data folder, database URL, URLs).
It imports none of the components nor the `remotegpu` command above them.
"""

__version__ = "0.1.0"
