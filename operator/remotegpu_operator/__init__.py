"""remotegpu_operator."""
