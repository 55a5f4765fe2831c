"""Reports over tracked runs: learning curves with confidence bands, tables, sweep figures, HTML."""
