"""The cross-layer transcoder (`clt.py`) and its parts.

Importing the package registers the built-in sparsifiers of `topk.py` and `jumprelu.py`
in the registry of `sparsifiers.py` (as timm's model registry does), so that
`build_sparsifier` finds them whichever module of the package is imported first.
"""

from clt_lightning.models import jumprelu, topk  # noqa: F401  (registers the sparsifiers)
