"""Optional integrations with other frameworks."""
