"""A VQ-VAE image tokenizer trained by this project: convolutional encoder and decoder with an
EMA codebook (VQ-VAE-2 / VQGAN-style quantizer, without the adversarial loss)."""
