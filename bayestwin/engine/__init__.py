"""Engine: PyMC graphs compiled to JAX, and vectorised NUTS across patients."""
