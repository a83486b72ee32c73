"""``python -m linear_decoder_jax`` works like ``ldj``."""

from linear_decoder_jax.cli import console_main

if __name__ == "__main__":
    console_main()
