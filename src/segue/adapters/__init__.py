"""Pure key-mapping adapters between foreign checkpoint layouts and segue's native (official) names."""
