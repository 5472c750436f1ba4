"""Built on the plan and the load: listing, diff and convert."""
