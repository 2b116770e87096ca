"""SparseSpec (sparse self-speculative decoding) as a Hub ``custom_generate`` recipe.

transformers loads this file for ``model.generate(..., custom_generate="<this repo>", trust_remote_code=True)``
and calls ``generate(model=model, **generate_arguments)`` with the raw arguments of ``generate``. The work is
done by the installed ``hf_sparsespec`` package; this file only forwards to it.
"""

from hf_sparsespec.generation.registry import generate_by_name


def generate(model, **generate_arguments):
    """Decode with SparseSpec; takes and returns what ``model.generate`` does (see hf_sparsespec.generate)."""
    return generate_by_name(model, **generate_arguments)
