"""What Optuna sweeps and lever studies share: params overrides and the cache of built stages."""
