"""Linear-time attention: kernel, recurrent, latent and hybrid forms."""
