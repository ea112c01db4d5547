"""One module per DataPlaneService endpoint; each translates HTTP to pluginv2 and back."""
