"""hashicorp/go-plugin internal services (package plugin)."""
