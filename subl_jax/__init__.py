"""subl_jax: a JAX framework for studying subliminal learning."""

__version__ = "0.1.0"
