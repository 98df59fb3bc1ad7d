"""The example shop: orders, inventory, and the read models (projections) built from their events."""
