"""remotegpu_gateway."""
