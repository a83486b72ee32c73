"""Training LinearSCVI in JAX: scvi-tools 1.4.2's objective, optimizer and data split."""
