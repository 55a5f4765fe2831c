"""The driver side: trial actors, placement groups, retries, progress, and (later) Optuna ask/tell."""
