"""crnet_jax: Res-CR-Net lung segmentation in JAX/Flax NNX."""
