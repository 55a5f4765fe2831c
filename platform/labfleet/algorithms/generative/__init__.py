"""Deep generative models: VAE (vae.py) and GAN (gan.py), on the datasets of `labfleet.data`."""
