"""Deep generative models (VAE, GAN)."""
