"""subl_jax: a JAX framework for studying subliminal learning."""

__version__ = "0.1.0"

from subl_jax.core.api import Model, load  # noqa: E402

__all__ = ["Model", "load", "__version__"]
