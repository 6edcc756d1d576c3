"""The team gateway: virtual keys, budgets, rate limits and who may call what."""
