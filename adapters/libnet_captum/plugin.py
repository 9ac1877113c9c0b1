"""libnet plugin entry point of the Captum adapter (import-light: captum is imported lazily)."""
