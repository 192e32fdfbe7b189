"""The baselines the generator is compared with: Model Soup and COND P-DIFF."""
