"""Controllers: keep the route table and DataPlaneService status in step with the store."""
