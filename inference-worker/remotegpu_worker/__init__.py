"""remotegpu_worker."""
