"""Example agents a poolq user would deploy (declared in config/pools.toml)."""
