"""hf_sparsespec: sparse self-speculative decoding (SparseSpec, arXiv 2512.01278) for transformers.

``import hf_sparsespec`` registers the "sparsespec" attention function and makes
``model.generate(..., custom_generate="sparsespec")`` resolve to this package.
"""

from .attention import register_attention
from .config import SparseSpecConfig
from .generation import SparseSpecOutput, generate
from .generation.engine import NonFiniteError
from .generation.registry import install as _install_generate_name

register_attention()
_install_generate_name()

__all__ = ["NonFiniteError", "SparseSpecConfig", "SparseSpecOutput", "generate"]
__version__ = "0.1.0"
