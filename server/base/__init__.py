"""What every layer shares: errors, tensor specs, metrics, test hold points."""
