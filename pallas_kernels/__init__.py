"""Pallas kernels (with pure-jnp references) used by qwen_jax."""
