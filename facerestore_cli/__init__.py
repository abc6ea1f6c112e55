"""facerestore: restore degraded faces in photos and videos with reward-tuned diffusion models.

The package's parts, lowest first (each imports only parts before it; docs/DESIGN.md):
errors, paths, devices, configfile < io < faces < models < metrics < rewards < data < export
< restore < train < evaluate < commands < cli.
"""

__version__ = "0.1.0"
